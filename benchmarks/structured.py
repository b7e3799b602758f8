"""Structured output on CPU: SmolLM2-135M decode tokens/s under a JSON Schema constraint vs unconstrained.

In one run, with the same weights, prompts, thread count and sampler (temperature 1, seeded: both take
the engine's sampling path, so the difference is the constraint's work), each system decodes the same
prompts on an ``Engine`` at batch 1 and batch 8:

- unconstrained (the reference), ``ignore_eos`` so that it runs the whole budget;
- ``json_schema`` (``lamina.generate.grammar``, llguidance): a schema with a free-text field, so the
  model writes until the budget rule closes the object (its outputs are checked to parse).

Tokens/s counts the tokens after the first step (prefill excluded). Every repeat times each system once,
round-robin, so load from other jobs falls on both alike; figures are medians. Also printed: the time to
build the constraint of a schema never seen before (compile + first mask), i.e. what a new schema adds to
the time to first token, and the first request's one-off cost per tokenizer.

Target (``headline:`` lines): constrained >= 0.9x unconstrained tokens/s (at most 10% slower) at batch 1
and batch 8.

    python benchmarks/structured.py [--tokens 64] [--threads 2] [--repeats 3]
    python benchmarks/structured.py --quick      # 24 tokens, 1 repeat
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

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

    def run(batch: int, constrained: bool, seed: int) -> tuple[float, int]:
        engine = Engine(model, tok, eos, max_batch_size=batch)
        seqs = []
        for i, p in enumerate(prompts[:batch]):
            extra = {"json_schema": SCHEMA} if constrained else {"ignore_eos": True}
            cfg = GenerationConfig(temperature=1.0, seed=seed + i, max_new_tokens=args.tokens, **extra)
            seqs += engine.submit(p, cfg)
        engine.step()  # prefill and the first token
        first = sum(len(s.tokens) for s in seqs)
        t = time.perf_counter()
        while engine.has_work():
            engine.step()
        seconds = time.perf_counter() - t
        if constrained:
            for s in seqs:
                json.loads(s.text or "")
        return seconds, sum(len(s.tokens) for s in seqs) - first

    rates: dict[tuple[int, bool], list[float]] = {}
    for r in range(args.repeats):
        for batch in (1, 8):
            for constrained in (False, True):
                seconds, tokens = run(batch, constrained, seed=100 * r)
                rates.setdefault((batch, constrained), []).append(tokens / seconds)
    print(f"{'batch':>5} {'system':>14} {'tokens/s':>9}")
    for (batch, constrained), values in rates.items():
        print(
            f"{batch:>5} {'json_schema' if constrained else 'unconstrained':>14} {statistics.median(values):9.1f}"
        )
    for batch in (1, 8):
        ratio = statistics.median(rates[batch, True]) / statistics.median(rates[batch, False])
        headline(f"json_schema decode batch {batch} tokens/s", ratio, "unconstrained", 0.9)


if __name__ == "__main__":
    main()
