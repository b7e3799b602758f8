"""Writes tests/eval/reference.json: lm-evaluation-harness's ``hf`` backend's log-likelihoods on every
multiple-choice fixture, and transformers' sliding-window perplexity, for SmolLM2's HF export.

Run once (minutes on 2 cores), commit the output: ``python tests/eval/make_reference.py``. The suite
compares lamina against these numbers and re-checks a few items live against lm-eval
(tests/eval/test_reference.py).

- Requests: each item's prompt as lamina builds it (``lamina.eval.multiple_choice.build_requests``'s
  strings: lm-eval's default prompt of the task) and ``" " + choice``, scored by
  ``lm_eval.models.huggingface.HFLM(...).loglikelihood``; acc / acc_norm as lm-eval computes them
  (``np.argmax(lls)``, ``np.argmax(lls / len(choice))``).
- Perplexity: transformers' "Perplexity of fixed-length models" loop (windows of MAX_LENGTH tokens every
  STRIDE tokens, labels -100 before each window's new tokens), each token's loss counted once.
"""

from __future__ import annotations

import json
import math
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures"
OUT = HERE / "reference.json"
MC_TASKS = [
    ("arc_easy", 0), ("arc_easy", 2), ("hellaswag", 0), ("mmlu", 2), ("truthfulqa_mc1", 0),
    ("truthfulqa_mc2", 0), ("wic", 0), ("bigbench_cause_and_effect", 0),
]  # fmt: skip
SEED = 1234
LIMIT = 8  # items per task: enough to cover each format, minutes on 2 cores
MAX_LENGTH, STRIDE = 64, 32


def export(lm, folder: Path) -> Path:
    from lamina.checkpoint.hf import export_hf

    return export_hf(folder, lm.model, lm.tokenizer, lm.generation)


def prompts(lm, name: str, shots: int) -> tuple[list, list[str]]:
    from lamina.eval.tasks import load_task

    task = load_task(name, FIXTURES)
    rng = random.Random(SEED)  # the draws lamina's build_requests makes: items in order, one rng
    items = task.items[:LIMIT]
    return items, [task.context(item, shots, rng) for item in items]


def hf_perplexity(model, ids: list[int]) -> tuple[float, int]:
    t = torch.tensor([ids])
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), STRIDE):
        end = min(begin + MAX_LENGTH, len(ids))
        trg_len = end - prev_end
        input_ids = t[:, begin:end]
        target = input_ids.clone()
        target[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target).loss
        n = int((target[:, 1:] != -100).sum())  # tokens the shifted loss averaged over
        nll += float(loss) * n
        count += n
        prev_end = end
        if end == len(ids):
            break
    return nll, count


def main() -> None:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lamina

    lm = lamina.load("smollm2")
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = export(lm, Path(tmp) / "hf")
        ref = HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=16)
        out: dict = {"model": "smollm2 (HF export of the packaged GGUF, fp32)", "lm_eval": __import__("lm_eval").__version__,
                     "seed": SEED, "tasks": {}}  # fmt: skip
        for name, shots in MC_TASKS:
            items, contexts = prompts(lm, name, shots)
            requests = [
                Instance(request_type="loglikelihood", doc={}, arguments=(c, " " + ch), idx=k)
                for c, item in zip(contexts, items, strict=True)
                for k, ch in enumerate(item.choices)
            ]
            scores = ref.loglikelihood(requests)
            rows, r = [], 0
            for item in items:
                lls = [s for s, _ in scores[r : r + len(item.choices)]]
                r += len(item.choices)
                lens = np.array([float(len(c)) for c in item.choices])
                rows.append({"source": item.source, "loglikelihoods": lls,
                             "acc": float(np.argmax(lls) == item.gold),
                             "acc_norm": float(np.argmax(np.array(lls) / lens) == item.gold)})  # fmt: skip
            out["tasks"][f"{name}:{shots}"] = rows
            print(name, shots, "acc", sum(x["acc"] for x in rows) / len(rows), file=sys.stderr)
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(hf_dir)
        text = (FIXTURES / "text" / "sample.txt").read_text(encoding="utf-8")
        ids = tok(text)["input_ids"]
        nll, count = hf_perplexity(model, ids)
        out["perplexity"] = {"file": "text/sample.txt", "max_length": MAX_LENGTH, "stride": STRIDE,
                             "tokens": count, "nll": nll, "token_perplexity": math.exp(nll / count)}  # fmt: skip
    OUT.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
