"""Structured output on CPU: SmolLM2-135M decode tokens/s under a JSON Schema constraint vs unconstrained.

In one run, with the same weights, prompts, thread count and sampler (temperature 1, seeded: both take
the engine's sampling path, so the difference is the constraint's work), each system decodes the same
prompts on an ``Engine`` at batch 1 and batch 8:

- ``json_schema`` (``lamina.generate.grammar``, llguidance): a schema with a free-text field, so the
  model writes until it closes the object itself or the budget rule closes it (outputs checked to parse);
- unconstrained, **matched** (the reference of the headlines): ``ignore_eos``, each row stopped at the
  length of the constrained row with the same prompt and seed in the same repeat;
- unconstrained **to the limit** (shown, not a headline): ``ignore_eos``, every row runs the budget.

What is compared and why. The target is about the constraint's cost: masking each row every step, the
budget rule's check, the matcher's advance. A constrained row whose JSON closes before ``--tokens`` leaves
the batch (about 6.3 of 8 rows a step on average here), so a batch-8 constrained run spends part of
its steps with fewer rows, and since a CPU forward costs nearly the same for 5 rows as for 8, its
aggregate tokens/s falls with no per-token cost at all; the to-the-limit reference keeps 8 rows to the
end. The matched reference gives both sides the same rows, the same lengths and so the same batch shape
at every step: the ratio of their aggregate tokens/s is the constraint's whole cost per token, hiding
none of it (every masking, check and advance is inside the timed steps). Also printed per system:
the per-row decode rate (each row's tokens after the first / the time that row was in the batch, the mean
over rows) and the rows per step; and the to-the-limit ratio, for the record.

Tokens/s counts the tokens after the first step (prefill excluded). One untimed warm-up pair first; then
every repeat times each system once, in an order that alternates between repeats, so load from other
jobs falls on all alike; figures are medians over repeats. Also printed: the time to build the
constraint of a schema never seen before (compile + first mask), i.e. what a new schema adds to the time
to first token, and the first request's one-off cost per tokenizer.

Target (``headline:`` lines): constrained >= 0.9x unconstrained (matched) tokens/s, i.e. at most 10%
slower, at batch 1 and batch 8.

    python benchmarks/structured.py [--tokens 64] [--threads 2] [--repeats 3]
    python benchmarks/structured.py --quick      # 24 tokens, 1 repeat
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import NamedTuple

import torch
from common import headline, machine

PROMPTS = [
    "Tell me a story about a dragon.",
    "Describe your favourite city.",
    "What did you do last summer?",
    "Write about the sea.",
    "Explain how bread is made.",
    "Review a film you like.",
    "Describe a cat.",
    "Plan a trip to the mountains.",
]
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "text": {"type": "string"},
    },
    "required": ["title", "tags", "text"],
}


class Run(NamedTuple):
    rate: float  # aggregate tokens/s (after the first step)
    per_row: float  # mean over rows of (the row's tokens after the first / its time in the batch)
    rows: float  # rows in the batch per step, mean
    lengths: list[int]  # each row's output tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per prompt")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="24 tokens, 1 repeat")
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.repeats = 24, 1
    if args.threads:
        torch.set_num_threads(args.threads)

    import lamina
    from lamina.config import GenerationConfig
    from lamina.generate.constrain import make_constraint
    from lamina.generate.engine import Engine

    lm = lamina.load("smollm2")
    tok = lm.tokenizer
    assert tok is not None
    model, eos = lm.model, lm.generation.eos_token_ids
    vocab = model.config.vocab_size
    prompts = [tok.encode(p, add_special_tokens=False) for p in PROMPTS]
    print(machine(args.threads))

    t = time.perf_counter()
    make_constraint(GenerationConfig(json_schema=SCHEMA, max_new_tokens=args.tokens), tok, vocab, eos)
    cold = time.perf_counter() - t
    compiles = []
    for i in range(5):  # a schema never seen before: compile + matcher + the first closing path
        fresh = {**SCHEMA, "properties": {**SCHEMA["properties"], f"field_{i}": {"type": "integer"}}}
        t = time.perf_counter()
        c = make_constraint(GenerationConfig(json_schema=fresh, max_new_tokens=args.tokens), tok, vocab, eos)
        assert c is not None
        c.allowed(args.tokens)
        compiles.append(time.perf_counter() - t)
    print(f"constraint for a new schema: {1e3 * statistics.median(compiles):.1f} ms median of 5 "
          f"(first request per tokenizer, with the vocabulary build: {1e3 * cold:.0f} ms)")  # fmt: skip

    def run(batch: int, constrained: bool, seed: int, lengths: list[int] | None = None) -> Run:
        """One timed decode; ``lengths``: each row's max_new_tokens (unconstrained matched)."""
        engine = Engine(model, tok, eos, max_batch_size=batch)
        seqs = []
        for i, p in enumerate(prompts[:batch]):
            extra = {"json_schema": SCHEMA} if constrained else {"ignore_eos": True}
            budget = lengths[i] if lengths is not None else args.tokens
            cfg = GenerationConfig(temperature=1.0, seed=seed + i, max_new_tokens=budget, **extra)
            seqs += engine.submit(p, cfg)
        engine.step()  # prefill and the first token
        first = [len(s.tokens) for s in seqs]
        ended: list[float | None] = [None] * len(seqs)
        steps = rows = 0
        t = time.perf_counter()
        while engine.has_work():
            rows += sum(s.finish_reason is None for s in seqs)
            engine.step()
            steps += 1
            now = time.perf_counter() - t
            for i, s in enumerate(seqs):
                if ended[i] is None and s.finish_reason is not None:
                    ended[i] = now
        seconds = time.perf_counter() - t
        if constrained:
            for s in seqs:
                json.loads(s.text or "")
        made = [len(s.tokens) - f for s, f in zip(seqs, first, strict=True)]
        per_row = [m / e for m, e in zip(made, ended, strict=True) if m and e]
        return Run(
            sum(made) / seconds,
            statistics.fmean(per_row) if per_row else float("nan"),
            rows / max(steps, 1),
            [len(s.tokens) for s in seqs],
        )

    run(8, False, 10_000, run(8, True, 10_000).lengths)  # warm-up, untimed: first-call costs
    results: dict[tuple[int, str], list[Run]] = {}
    for r in range(args.repeats):
        for batch in (1, 8):
            seed, lengths = 100 * r, [args.tokens] * batch
            order = ["json_schema", "matched", "to the limit"]
            if r % 2:  # alternate which system runs first (the matched one needs the constrained lengths)
                order = ["to the limit", "json_schema", "matched"]
            for system in order:
                if system == "json_schema":
                    got = run(batch, True, seed)
                    lengths = got.lengths
                elif system == "matched":
                    got = run(batch, False, seed, lengths)
                else:
                    got = run(batch, False, seed)
                results.setdefault((batch, system), []).append(got)

    def med(batch: int, system: str, what: str) -> float:
        return statistics.median(getattr(x, what) for x in results[batch, system])

    print(f"{'batch':>5} {'system':>24} {'tokens/s':>9} {'per-row tok/s':>14} {'rows/step':>10}")
    for batch, system in results:
        name = system if system == "json_schema" else f"unconstrained {system}"
        print(
            f"{batch:>5} {name:>24} {med(batch, system, 'rate'):9.1f} "
            f"{med(batch, system, 'per_row'):14.2f} {med(batch, system, 'rows'):10.2f}"
        )
    for batch in (1, 8):
        c = med(batch, "json_schema", "rate")
        print(
            f"batch {batch}: json_schema / unconstrained to the limit: tokens/s "
            f"{c / med(batch, 'to the limit', 'rate'):.2f}x, per-row "
            f"{med(batch, 'json_schema', 'per_row') / med(batch, 'to the limit', 'per_row'):.2f}x"
        )
    for batch in (1, 8):
        ratio = med(batch, "json_schema", "rate") / med(batch, "matched", "rate")
        headline(f"json_schema decode batch {batch} tokens/s", ratio, "unconstrained (matched lengths)", 0.9)


if __name__ == "__main__":
    main()
