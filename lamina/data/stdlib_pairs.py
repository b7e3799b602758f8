"""A summarization task built from the running Python's standard library, offline: a function's source ->
the first line of its docstring.

    report = build_stdlib_pairs("data/stdlib-pairs")     # train.jsonl, val.jsonl, test.jsonl
    print(report.summary())
    print(baseline_scores("data/stdlib-pairs"))          # {"name_words": {...}, "best_constant": {...}}

Every function and method with a docstring in the built-in corpus (``lamina.data.builtin``: the standard
library without its test suites) gives one pair. The source is the function's code from its ``def`` line
(decorators left out), dedented, with the docstring's lines removed, so the answer is not in the input;
the target is the docstring's first non-blank line (``inspect.cleandoc``), stripped. A row of the JSONL
files is ``{"source", "source_words", "target", "target_words", "module", "name", "line"}``.

``source_words`` is the same code as a stream of words (``code_words``): every identifier split at
underscores and camelCase humps into lowercase words, every other symbol on its own, one space between
tokens (``def getLogger(self, name):`` -> ``def get logger ( self , name ) :``), the preprocessing of
code-summarization models (Ahmad et al. 2020, "A Transformer-based Approach for Source Code
Summarization", splits CamelCase and snake_case identifiers). A subword tokenizer then gives a word the
same tokens in the code and in the docstring (`` logger``), so a model can copy it from the source: in raw
code ``get_logger`` is ``get`` ``_`` ``logger`` and ``logger`` is never the docstring's `` logger``, and a
model trained on raw code scored below both baselines. ``target_words`` is the target as a model that
copies from ``source_words`` writes it (``target_words``): lowercased, after one space, so that its words,
the first included, are the same tokens as in ``source_words`` (byte-level BPE marks a word's start by
its space: the first word of ``Add an element.`` is ``Add``, the source's is `` add``); the task's ROUGE
lowercases both sides, so scores against ``target`` are the same. ``train.txt`` holds the training
split's ``source_words`` and ``target_words``, one per line, for ``lamina tokenizer train``.

The split is by module: a module goes wholly to train, val or test, chosen by a hash of its path and the
seed, so the test functions (and their neighbours) were never seen in training. A val or test pair whose
source also occurs in train (a function copied between modules) is dropped and counted.

Baselines (issue 12's bar for a trained model is 20% above both, in ROUGE-L):

- ``name_words``: the function's name split into lowercase words (``getLogger``, ``_get_logger`` ->
  ``get logger``);
- ``best_constant``: the one training first line whose mean ROUGE-L against the training targets is the
  highest, output for every function. Scoring every training line against every training target is
  quadratic (5,456 x 5,456 on Python 3.11), so the search prunes: candidates are visited in order of their
  mean ROUGE-1 F (computed for all at once as matrix products), an upper bound of their mean ROUGE-L F,
  and rouge-score's exact ROUGE-L is computed only until the bound falls below the best found. The whole
  training set takes about 30 s on 2 cores; ``n_candidates`` / ``n_targets`` restrict the search to a
  seeded sample of distinct training lines / training targets (exact on that sample).
"""

from __future__ import annotations

import ast
import json
import re
import textwrap
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lamina.errors import ConfigError

__all__ = [
    "SPLITS",
    "StdlibPairsReport",
    "baseline_scores",
    "best_constant",
    "build_stdlib_pairs",
    "code_words",
    "function_pairs",
    "identifier_words",
    "name_words",
    "split_of",
    "target_words",
]

SPLITS = ("train", "val", "test")


def function_pairs(module: str, text: str) -> Iterator[dict[str, Any]]:
    """The pairs of one module's source ``text``: one row per function or method with a docstring (see the
    module docstring for the fields). A module that does not parse gives none."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return
    lines = text.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        doc = ast.get_docstring(node, clean=True)
        first = next((ln.strip() for ln in (doc or "").splitlines() if ln.strip()), "")
        if not first:
            continue
        body0 = node.body[0]
        if body0.lineno == node.lineno or node.end_lineno is None or body0.end_lineno is None:
            continue  # a one-line function: the docstring shares the def line
        keep = lines[node.lineno - 1 : body0.lineno - 1] + lines[body0.end_lineno : node.end_lineno]
        source = textwrap.dedent("\n".join(keep)).strip("\n")
        yield {"source": source, "source_words": code_words(source), "target": first,
               "target_words": target_words(first), "module": module, "name": node.name,
               "line": node.lineno}  # fmt: skip


_TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+|\S")


def code_words(source: str) -> str:
    """``source`` as words: identifiers split into lowercase words (``identifier_words``), numbers and every
    other non-space character kept as tokens, joined by one space (line breaks and indentation dropped).
    ``def _getLogger(self):`` -> ``def get logger ( self ) :``."""
    out: list[str] = []
    for token in _TOKEN.findall(source):
        if token[0].isalpha() or token[0] == "_":
            out += identifier_words(token) or [token]  # "__" stays itself
        else:
            out.append(token)
    return " ".join(out)


def target_words(line: str) -> str:
    """A docstring line as a model reading ``code_words`` writes it: lowercased, after one space
    (``Add an element.`` -> `` add an element.``; see the module docstring)."""
    return " " + line.strip().lower()


def identifier_words(name: str) -> list[str]:
    """An identifier's words, lowercase, split at underscores and camelCase humps
    (``_getHTTPResponse`` -> ``["get", "http", "response"]``)."""
    name = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name)
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1 \2", name)
    return [w.lower() for w in re.split(r"[_\s]+", name) if w]


def split_of(module: str, seed: int = 0, val_fraction: float = 0.05, test_fraction: float = 0.05) -> str:
    """ "train", "val" or "test" for ``module``, by a CRC-32 hash of ``"{seed}:{module}"`` (the same on every
    machine and run)."""
    u = (zlib.crc32(f"{seed}:{module}".encode()) % 1_000_000) / 1_000_000
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


@dataclass
class StdlibPairsReport:
    """What ``build_stdlib_pairs`` wrote."""

    out_dir: Path
    pairs: dict[str, int]  # per split
    modules: dict[str, int]  # per split
    duplicates_dropped: int = 0  # val/test pairs whose source is also a training source
    files: dict[str, Path] = field(default_factory=dict)

    def summary(self) -> str:
        """One line per split and where the files are."""
        rows = [f"stdlib function -> docstring pairs in {self.out_dir}:"]
        for s in SPLITS:
            rows.append(f"  {s}: {self.pairs[s]:,} pairs from {self.modules[s]:,} modules")
        if self.duplicates_dropped:
            rows.append(f"  dropped {self.duplicates_dropped} val/test pairs whose source is also in train")
        return "\n".join(rows)


def build_stdlib_pairs(
    out_dir: str | Path,
    *,
    seed: int = 0,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    max_bytes: int | None = None,
) -> StdlibPairsReport:
    """Write ``train.jsonl``, ``val.jsonl`` and ``test.jsonl`` of the standard-library summarization task,
    and ``train.txt`` (the training split's ``source_words`` and targets, one per line, to train a
    tokenizer on), into ``out_dir`` (created; existing files of those names are replaced) and return the
    counts.

    ``val_fraction`` / ``test_fraction``: the expected share of modules in each held-out split; ``seed``
    chooses which; ``max_bytes`` reads only the first bytes of the corpus (quick runs and tests).
    Raises ``ConfigError`` for fractions outside [0, 1) that leave no training modules.
    """
    from lamina.data.builtin import stdlib_texts

    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConfigError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in [0, 1) and sum below 1"
        )
    rows: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    modules: dict[str, set[str]] = {s: set() for s in SPLITS}
    for module, text in stdlib_texts(max_bytes):
        split = split_of(module, seed, val_fraction, test_fraction)
        found = list(function_pairs(module, text))
        if found:
            rows[split] += found
            modules[split].add(module)
    seen = {r["source"] for r in rows["train"]}
    dropped = 0
    for split in ("val", "test"):
        kept = [r for r in rows[split] if r["source"] not in seen]
        dropped += len(rows[split]) - len(kept)
        rows[split] = kept
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for split in SPLITS:
        path = out / f"{split}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows[split]:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        tmp.replace(path)
        files[split] = path
    lines = out / "train.txt"  # what the tokenizer learns from: the model's inputs and outputs
    lines.write_text(
        "".join(f"{r['source_words']}\n{r['target_words']}\n" for r in rows["train"]), encoding="utf-8"
    )
    files["tokenizer_text"] = lines
    return StdlibPairsReport(
        out, {s: len(rows[s]) for s in SPLITS}, {s: len(modules[s]) for s in SPLITS}, dropped, files
    )


_DEF = re.compile(r"^\s*(?:async\s+)?def\s+(\w+)", re.MULTILINE)


def name_words(source: str) -> str:
    """The name of the first function defined in ``source``, split into lowercase words at underscores
    and camelCase humps (``_getLoggerClass`` -> ``get logger class``); "" when there is none."""
    m = _DEF.search(source)
    if m is None:
        return ""
    return " ".join(identifier_words(m.group(1)))


def best_constant(
    targets: Sequence[str], *, n_candidates: int | None = None, n_targets: int | None = None, seed: int = 0
) -> tuple[str, float]:
    """(line, its mean ROUGE-L F): the training line that, output for every input, scores best against the
    training ``targets`` (see the module docstring for the search; None: all candidates, all targets).
    Uses rouge-score's tokenizer (stemming) and scorer, as ``lamina.eval.seq2seq`` does."""
    from lamina.eval.seq2seq import _import

    rouge_scorer = _import("rouge_score.rouge_scorer")
    tokenizers = _import("rouge_score.tokenizers")
    if not targets:
        raise ConfigError("best_constant needs training targets")
    rng = np.random.default_rng(seed)
    distinct = sorted(set(targets))
    candidates = [
        distinct[i] for i in sorted(rng.permutation(len(distinct))[: n_candidates or len(distinct)])
    ]
    sample = [targets[i] for i in sorted(rng.permutation(len(targets))[: n_targets or len(targets)])]
    tok = tokenizers.DefaultTokenizer(use_stemmer=True)
    cand_tokens = [tok.tokenize(c) for c in candidates]
    sample_tokens = [tok.tokenize(t) for t in sample]
    bound = _mean_rouge1(cand_tokens, sample_tokens)  # (n_candidates,): >= each one's mean ROUGE-L F
    # rouge-score's own LCS scoring on the tokens made once (what RougeScorer.score does after tokenizing)
    score_lcs = rouge_scorer._score_lcs
    best, best_score = candidates[0], -1.0
    for i in np.argsort(-bound, kind="stable"):
        if bound[i] <= best_score:
            break
        score = float(np.mean([score_lcs(t, cand_tokens[i]).fmeasure for t in sample_tokens]))
        if score > best_score:
            best, best_score = candidates[i], score
    return best, best_score


def _mean_rouge1(cands: list[list[str]], targets: list[list[str]]) -> np.ndarray:
    """Mean over ``targets`` of ROUGE-1 F = 2 * overlap / (len(c) + len(t)) for each candidate, with the
    clipped overlap ``sum_w min(c_w, t_w) = sum_k [c_w >= k] . [t_w >= k]`` as binary matrix products."""
    vocab = {
        w: i for i, w in enumerate(sorted({w for c in cands for w in c} & {w for t in targets for w in t}))
    }
    c_counts, t_counts = [Counter(c) for c in cands], [Counter(t) for t in targets]
    deepest = max([1, *(n for counts in c_counts for n in counts.values())])
    overlap = np.zeros((len(cands), len(targets)), dtype=np.float32)
    for k in range(1, deepest + 1):
        C = _levels(c_counts, vocab, k)
        T = _levels(t_counts, vocab, k)
        overlap += C @ T.T
    lengths = np.add.outer(np.array([len(c) for c in cands]), np.array([len(t) for t in targets]))
    f1 = np.divide(2 * overlap, lengths, out=np.zeros_like(overlap), where=lengths > 0)
    return f1.mean(axis=1) + 1e-6  # float32 sums: a hair of slack keeps it an upper bound


def _levels(counts: list[Counter[str]], vocab: dict[str, int], k: int) -> np.ndarray:
    out = np.zeros((len(counts), len(vocab)), dtype=np.float32)
    for r, c in enumerate(counts):
        for w, n in c.items():
            if n >= k and w in vocab:
                out[r, vocab[w]] = 1.0
    return out


def _read(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def baseline_scores(
    folder: str | Path,
    split: str = "test",
    *,
    n_candidates: int | None = None,
    n_targets: int | None = None,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """The two baselines on ``split`` of a folder ``build_stdlib_pairs`` wrote: ``{"name_words": scores,
    "best_constant": scores | {"text": line}}``, each ``scores`` from ``lamina.eval.seq2seq.score_pairs``
    (ROUGE-L under ``"rougeL"``)."""
    from lamina.eval.seq2seq import score_pairs

    folder = Path(folder)
    train, rows = _read(folder / "train.jsonl"), _read(folder / f"{split}.jsonl")
    if not rows:
        raise ConfigError(f"{folder / f'{split}.jsonl'} has no pairs")
    refs = [r["target"] for r in rows]
    text, _ = best_constant(
        [r["target"] for r in train], n_candidates=n_candidates, n_targets=n_targets, seed=seed
    )
    return {
        "name_words": score_pairs([name_words(r["source"]) for r in rows], refs),
        "best_constant": {**score_pairs([text] * len(rows), refs), "text": text},
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lamina.data.stdlib_pairs OUT_DIR``: build the task into OUT_DIR and print the two
    baselines' ROUGE-L on its test split."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m lamina.data.stdlib_pairs", description=main.__doc__)
    p.add_argument("out_dir", help="where train.jsonl, val.jsonl and test.jsonl go")
    p.add_argument("--seed", type=int, default=0, help="which modules go to val and test")
    args = p.parse_args(argv)
    print(build_stdlib_pairs(args.out_dir, seed=args.seed).summary())
    for name, scores in baseline_scores(args.out_dir).items():
        extra = f"  ({scores['text']!r})" if "text" in scores else ""
        print(f"  baseline {name}: test ROUGE-L {scores['rougeL']:.4f}{extra}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
