"""Generation tasks: greedy answers through lamina's batched engine, scored by exact match, token F1
(SQuAD's normalisation) and GSM8K-style numeric extraction.

    result = evaluate_generation(lm, load_task("gsm8k", "data/"), shots=5)
    result.metrics   # {"exact_match": ..., "f1": ..., "exact_match_stderr": ..., "n": ...}

- ``normalize_answer``: SQuAD v1.1's ``evaluate-v1.1.py``: lower case, punctuation and the articles
  a / an / the removed, whitespace collapsed; ``exact_match`` and ``f1`` (token overlap) take the best over
  the references, as that script does.
- GSM8K (Cobbe et al. 2021; lm-eval's ``gsm8k`` filters): the reference number follows "#### ";
  ``strict_match`` reads "#### N" from the output, ``flexible_extract`` the last number in it; commas,
  ``$`` and a trailing period are dropped before comparing.

Decoding is greedy with the task's stop strings (lm-eval's ``until``) and ``max_new_tokens``; every prompt
goes through one engine (``generate_greedy``). A prompt longer than the window keeps its last
``max_length - max_new_tokens`` tokens, as lm-eval's ``hf`` backend cuts it (``HFLM.generate_until``).
"""

from __future__ import annotations

import random
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from lamina.errors import ConfigError
from lamina.eval.multiple_choice import TaskResult, summarize
from lamina.generate.batch import MAX_BATCH_SIZE  # contexts decoded together by default

if TYPE_CHECKING:
    from lamina.checkpoint.load import LoadedModel
    from lamina.eval.tasks import Task

Progress = Callable[[int, int], None]


def normalize_answer(s: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, references: list[str]) -> float:
    """1.0 when the normalised prediction equals a normalised reference."""
    return float(any(normalize_answer(prediction) == normalize_answer(r) for r in references))


def token_f1(prediction: str, references: list[str]) -> float:
    """The best token-overlap F1 against the references (SQuAD's ``f1_score``)."""

    def f1(pred: str, ref: str) -> float:
        p, r = normalize_answer(pred).split(), normalize_answer(ref).split()
        common = sum((Counter(p) & Counter(r)).values())
        if common == 0:
            return 0.0
        precision, recall = common / len(p), common / len(r)
        return 2 * precision * recall / (precision + recall)

    return max(f1(prediction, r) for r in references)


STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def _clean_number(s: str) -> str:
    return s.replace(",", "").replace("$", "").rstrip(".").strip()


def extract_number(text: str, strict: bool = True) -> str | None:
    """The answer number of a GSM8K-style output: after "#### " (``strict``) or the last number in it
    (lm-eval's ``flexible-extract``); None when there is none."""
    if strict:
        m = STRICT.search(text)
        return _clean_number(m.group(1)) if m else None
    found = [a or b for a, b in FLEXIBLE.findall(text)]
    return _clean_number(found[-1]) if found else None


def generate_greedy(
    lm: LoadedModel,
    contexts: Sequence[str],
    stops: Sequence[Sequence[str]],
    max_new_tokens: Sequence[int],
    max_length: int | None = None,
    max_batch_size: int = MAX_BATCH_SIZE,
    progress: Progress | None = None,
) -> list[str]:
    """Greedy continuations of raw-text ``contexts`` as lm-eval's ``hf`` backend makes them
    (``HFLM.generate_until``): context i is encoded (``add_special_tokens`` as the tokenizer is set up)
    and, when longer, cut from the left to its last ``max_length - max_new_tokens[i]`` tokens (an
    encoder-decoder's source: to ``max_length``); decoding stops at eos, a string of ``stops[i]`` or
    ``max_new_tokens[i]`` tokens; the new tokens are decoded on their own (a SentencePiece word's leading
    space dropped, as ``tokenizer.decode`` does) and the text is cut at each stop string in turn.
    ``max_length`` defaults to the model's ``max_seq_len``. All contexts decode together on one engine
    (rows of at most ``max_batch_size``). Raises ``ConfigError`` when a ``max_new_tokens`` leaves no room
    for context (lm-eval asserts the same)."""
    from lamina.generate.engine import Engine
    from lamina.generate.text import build_prompt_ids, generation_config

    limit = max_length or lm.model.config.max_seq_len
    enc_dec = lm.model.config.arch == "encoder-decoder"
    engine = Engine(lm.model, lm.tokenizer, lm.generation.eos_token_ids, max_batch_size=max_batch_size)
    seqs = []
    for context, stop, n in zip(contexts, stops, max_new_tokens, strict=True):
        room = limit if enc_dec else limit - n
        if room <= 0:
            raise ConfigError(
                f"max_gen_toks={n} leaves no room for the context in max_length={limit} tokens; "
                "ask for fewer new tokens"
            )
        ids = build_prompt_ids(lm, context, chat=False)[-room:]
        cfg = generation_config(lm, None, temperature=0.0, stop=list(stop), max_new_tokens=n)
        seqs.append(engine.submit(ids, cfg)[0])
    finished = 0
    while engine.has_work():
        done = len({id(d.seq) for d in engine.step() if d.finished})
        finished += done
        if progress is not None and done:
            progress(finished, len(seqs))
    out = []
    for seq, stop in zip(seqs, stops, strict=True):  # the new tokens decoded alone, as the hf backend does
        text = lm.tokenizer.decode(seq.tokens, skip_special_tokens=True) if lm.tokenizer else ""
        for s in stop:
            if s:
                text = text.split(s)[0]
        out.append(text)
    return out


def evaluate_generation(
    lm: LoadedModel,
    task: Task,
    shots: int = 0,
    seed: int = 1234,
    limit: int | None = None,
    max_new_tokens: int = 256,
    max_batch_size: int = MAX_BATCH_SIZE,
    progress: Progress | None = None,
) -> TaskResult:
    """Greedy answers to ``task``'s items (kind "generate") with ``shots`` examples drawn with ``seed``,
    scored as the module doc says (``exact_match``, ``f1``; for GSM8K also ``strict_match`` and
    ``flexible_extract``)."""
    if task.kind != "generate":
        raise ConfigError(f"task {task.name} is a multiple-choice task; use evaluate_multiple_choice")
    rng = random.Random(seed)
    items = task.items[:limit] if limit is not None else task.items
    contexts = [task.context(item, shots, rng) for item in items]
    outputs = generate_greedy(lm, contexts, [task.until] * len(contexts), [max_new_tokens] * len(contexts),
                              max_batch_size=max_batch_size, progress=progress)  # fmt: skip
    samples = []
    for n, (item, context, output) in enumerate(zip(items, contexts, outputs, strict=True)):
        if task.name == "gsm8k":
            gold = extract_number(item.answers[0])
            metrics = {
                "strict_match": float(extract_number(output) == gold),
                "flexible_extract": float(extract_number(output, strict=False) == gold),
            }
        else:
            metrics = {"exact_match": exact_match(output, item.answers), "f1": token_f1(output, item.answers)}
        samples.append({"id": n, "source": item.source, "context": context, "output": output,
                        "answers": item.answers, "metrics": metrics})  # fmt: skip
    return summarize(task.name, samples, task.skipped)
