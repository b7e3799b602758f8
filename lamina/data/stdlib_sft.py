"""An instruction set built from the Python standard library, to teach a model an answer format.

Each conversation asks about a public top-level function of a standard-library module, and the answer is
one JSON object in a fixed shape, the module, the function's name and the first line of its docstring::

    user:      What does the function dumps in the json module do?
    assistant: {"module": "json", "function": "dumps", "summary": "Serialize ``obj`` to a JSON formatted ``str``."}

A chat model asked the same question answers in prose, so :func:`follows_shape` (the reply is exactly
such an object) measures whether fine-tuning taught the format. Every machine with the same Python has
the same functions (parsed with ``ast`` from the files of ``lamina.data.builtin.stdlib_files``; nothing
is imported); the split into training and held-out functions is by function, seeded.

    train, held_out = stdlib_sft(n_train=400, n_held_out=50)
    write_jsonl("stdlib_sft.jsonl", train)     # lamina finetune --task sft --data stdlib_sft.jsonl ...
"""

from __future__ import annotations

import functools
import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lamina.data.builtin import stdlib_files

__all__ = ["StdlibFunction", "follows_shape", "stdlib_functions", "stdlib_sft", "write_jsonl"]

KEYS = ("module", "function", "summary")
QUESTIONS = (
    "What does the function {name} in the {module} module do?",
    "Describe {module}.{name}.",
    "Explain the Python function {module}.{name}.",
    "What is {name} from Python's {module} module for?",
    "Tell me about {module}.{name} in the standard library.",
)
MAX_SUMMARY = 90  # characters of the docstring's first line; longer ones are left out


@dataclass(frozen=True)
class StdlibFunction:
    """A public top-level function of a standard-library module and its docstring's first line."""

    module: str
    name: str
    summary: str

    def answer(self) -> str:
        """The reply in the taught shape: one line of JSON with ``KEYS`` in order."""
        return json.dumps(dict(zip(KEYS, (self.module, self.name, self.summary), strict=True)))


@functools.cache
def stdlib_functions() -> tuple[StdlibFunction, ...]:
    """Every public top-level function with a one-line summary (10 to ``MAX_SUMMARY`` printable ASCII
    characters, not a signature) in the standard library's public modules, sorted by module and name.
    Found by a pattern over the source (a ``def`` at column 0 followed by a docstring), which takes
    about a second where parsing every file would take several."""
    out = set()
    for name, path in stdlib_files():
        parts = name.removeprefix("stdlib/").removesuffix(".py").split("/")
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if not parts or any(p.startswith("_") or p == "__main__" for p in parts):
            continue
        module = ".".join(parts)
        source = path.read_text(encoding="utf-8", errors="replace")
        for m in _DEF.finditer(source):
            line = (m.group(2).strip() or m.group(3).strip()).split('"""')[0].split("'''")[0].strip()
            ok = 10 <= len(line) <= MAX_SUMMARY and line.isascii() and line.isprintable()
            if ok and not line.startswith((m.group(1) + "(", "(")):
                out.add(StdlibFunction(module, m.group(1), line))
    return tuple(sorted(out, key=lambda f: (f.module, f.name)))


# def name(args) -> annotation:  then an indented docstring: its first line (or the next one if empty)
_DEF = re.compile(
    r"^def ([A-Za-z]\w*)\((?:[^()]|\([^()]*\))*\)[ \t]*(?:->[^:\n]+)?:[ \t]*\n"
    r"[ \t]+[rRuU]?(?:\"\"\"|\'\'\')([^\n]*)\n?([^\n]*)",
    re.MULTILINE,
)


def conversation(f: StdlibFunction, question: int) -> list[dict[str, str]]:
    """The user's question (``QUESTIONS[question]``) about ``f`` and the answer in the taught shape."""
    q = QUESTIONS[question % len(QUESTIONS)].format(module=f.module, name=f.name)
    return [{"role": "user", "content": q}, {"role": "assistant", "content": f.answer()}]


def stdlib_sft(
    n_train: int, n_held_out: int, seed: int = 0
) -> tuple[list[list[dict[str, str]]], list[list[dict[str, str]]]]:
    """``n_train`` training and ``n_held_out`` held-out conversations about distinct functions (no
    function in both), each question in one of ``QUESTIONS``' phrasings. Raises ``ValueError`` if the
    standard library has fewer functions than asked for."""
    functions = stdlib_functions()
    if n_train + n_held_out > len(functions):
        raise ValueError(f"asked for {n_train + n_held_out} functions; this Python has {len(functions)}")
    rng = random.Random(seed)
    chosen = rng.sample(list(functions), n_train + n_held_out)
    chats = [conversation(f, rng.randrange(len(QUESTIONS))) for f in chosen]
    return chats[:n_train], chats[n_train:]


def follows_shape(reply: str) -> bool:
    """Whether ``reply`` (stripped) is one JSON object with exactly ``KEYS``, in that order, all strings."""
    try:
        value = json.loads(reply.strip())
    except ValueError:
        return False
    return (
        isinstance(value, dict) and tuple(value) == KEYS and all(isinstance(v, str) for v in value.values())
    )


def write_jsonl(path: str | Path, conversations: Iterable[Sequence[dict[str, Any]]]) -> Path:
    """Write conversations as JSONL lines ``{"messages": [...]}`` (what ``lamina finetune --task sft`` reads)."""
    p = Path(path)
    p.write_text("".join(json.dumps({"messages": list(c)}) + "\n" for c in conversations), encoding="utf-8")
    return p


def shape_shares(samples: str | Path) -> dict[int, float]:
    """Per evaluation step, the share of the answers in a run's ``samples.jsonl`` (``lamina finetune
    --task sft`` writes it) that follow the shape."""
    by_step: dict[int, list[bool]] = {}
    for line in Path(samples).read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        by_step.setdefault(int(row["step"]), []).append(follows_shape(row["output"]))
    return {step: sum(v) / len(v) for step, v in sorted(by_step.items())}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lamina.data.stdlib_sft FOLDER [--train N] [--held-out N] [--seed S]`` writes
    ``FOLDER/train.jsonl`` and ``FOLDER/held_out.jsonl``; ``--score RUN`` prints, per evaluation of the
    run in ``RUN``, the share of its sampled held-out answers in the shape."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m lamina.data.stdlib_sft", description=main.__doc__)
    p.add_argument(
        "folder", help="where to write train.jsonl and held_out.jsonl (with --score: the run folder)"
    )
    p.add_argument("--train", type=int, default=800, help="training conversations (default 800)")
    p.add_argument("--held-out", type=int, default=100, help="held-out conversations (default 100)")
    p.add_argument("--seed", type=int, default=0, help="which functions and phrasings (default 0)")
    p.add_argument("--score", action="store_true", help="score FOLDER/samples.jsonl instead of writing data")
    args = p.parse_args(argv)
    folder = Path(args.folder)
    if args.score:
        for step, share in shape_shares(folder / "samples.jsonl").items():
            print(f"step {step}: {share:.0%} of the held-out answers in the shape")
        return 0
    train, held_out = stdlib_sft(args.train, args.held_out, args.seed)
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "train.jsonl", train)
    write_jsonl(folder / "held_out.jsonl", held_out)
    print(f"{len(train)} training and {len(held_out)} held-out conversations in {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
