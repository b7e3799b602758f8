"""``lamina eval``'s library side: run tasks (and perplexity) on a model, report as a table and JSON.

    result = evaluate("smollm2", EvalConfig(tasks=["arc_easy", "mmlu"], data="data/", shots=5, limit=100))
    print(format_table(result))
    Path("results.json").write_text(json.dumps(result, indent=1))

The JSON holds ``config`` (the EvalConfig), ``versions`` (lamina, torch, the model), ``results`` (per task
its metrics, with standard errors, ``n`` and ``skipped``), ``skipped`` (per task "file:row: why"),
``perplexity`` when asked for, and ``samples`` (per task one record per item) unless ``samples`` is off.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lamina.errors import ConfigError
from lamina.eval.tasks import TASKS

if TYPE_CHECKING:
    from lamina.checkpoint.load import LoadedModel
    from lamina.tokenizer import Tokenizer

Progress = Callable[[str, int, int], None]


@dataclass
class EvalConfig:
    """What ``lamina eval`` runs (the ``--tasks/--data/--shots/...`` flags)."""

    tasks: list[str] = field(
        default_factory=list,
        metadata={  # the names from TASKS, so a new task is listed
            "help": f"task names, comma-separated: {', '.join(TASKS)}, bigbench_NAME (a BIG-bench JSON task "
            "under data/bigbench/NAME)"
        },
    )
    data: str | None = None  # folder of the tasks' published files (layout: `lamina eval --help`)
    shots: int = 0  # few-shot examples before each question (TruthfulQA stays zero-shot)
    seed: int = 1234  # draws the few-shot examples (MMLU takes the first k of its dev file)
    limit: int | None = None  # score only the first N items of each task
    batch_tokens: int = 2048  # padded context + choice tokens scored in one forward batch
    max_new_tokens: int = 256  # generation tasks: longest answer
    perplexity: str | None = None  # text file, JSONL ("text" field), folder, or token-shard folder
    split: str = "val"  # token-shard folder: the split scored (its tokenizer must be the model's)
    max_length: int | None = None  # perplexity window in tokens (None: the model's max_seq_len)
    stride: int | None = None  # tokens between perplexity windows (None: half of max_length)
    samples: bool = True  # keep one record per item in the JSON (needed by `lamina eval compare`)

    def __post_init__(self) -> None:
        self.tasks = [t.strip() for entry in self.tasks for t in str(entry).split(",") if t.strip()]
        if self.shots < 0:
            raise ConfigError(f"shots={self.shots} must be >= 0")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit={self.limit} must be >= 1 (or unset: every item)")
        if self.batch_tokens < 1:
            raise ConfigError(f"batch_tokens={self.batch_tokens} must be >= 1")


def evaluate(
    model: str | LoadedModel, config: EvalConfig, progress: Progress | None = None
) -> dict[str, Any]:
    """Run ``config``'s tasks and perplexity on ``model`` (a name, path or loaded model); the result as
    the module doc describes. Raises ``ConfigError`` when there is nothing to run, a task is unknown
    (listing the known ones) or its files are missing, before any scoring."""
    import torch

    import lamina
    from lamina.eval.generation_tasks import evaluate_generation
    from lamina.eval.multiple_choice import evaluate_multiple_choice
    from lamina.eval.tasks import load_task

    if not config.tasks and config.perplexity is None:
        raise ConfigError("nothing to evaluate: give --tasks (with --data DIR) and/or --perplexity FILE")
    if config.tasks and config.data is None:
        raise ConfigError("--tasks needs --data DIR, the folder holding the tasks' published files")
    tasks = [load_task(name, config.data) for name in config.tasks] if config.data else []
    lm = lamina.load(model) if isinstance(model, str) else model
    out: dict[str, Any] = {
        "config": dataclasses.asdict(config),
        "versions": {"lamina": lamina.__version__, "torch": torch.__version__, "model": lm.entry.name},
        "results": {},
        "skipped": {},
    }
    samples: dict[str, Any] = {}
    for task in tasks:

        def step(done: int, total: int, name: str = task.name) -> None:
            if progress is not None:
                progress(name, done, total)

        if task.kind == "generate":
            result = evaluate_generation(lm, task, config.shots, config.seed, config.limit,
                                         config.max_new_tokens, progress=step)  # fmt: skip
        else:
            result = evaluate_multiple_choice(lm, task, config.shots, config.seed, config.limit,
                                              config.batch_tokens, step)  # fmt: skip
        out["results"][task.name] = result.metrics
        out["skipped"][task.name] = result.skipped
        samples[task.name] = result.samples
    if config.perplexity is not None:
        from lamina.eval.perplexity import is_token_shards, perplexity, read_documents, shard_documents

        docs: list[str] | list[list[int]]
        if is_token_shards(config.perplexity):
            docs, shard_tok = shard_documents(config.perplexity, config.split)
            _same_vocabulary(lm, shard_tok, config.perplexity)
        else:
            docs = read_documents(config.perplexity)
        ppl = perplexity(lm, docs, config.max_length, config.stride,
                         progress=lambda d, t: progress("perplexity", d, t) if progress else None)  # fmt: skip
        out["perplexity"] = ppl.as_dict()
    if config.samples:
        out["samples"] = samples
    return out


def _same_vocabulary(lm: LoadedModel, tokenizer: Tokenizer, folder: str) -> None:
    """Refuse token shards whose ids mean other tokens than the model's (``ConfigError`` naming both)."""
    if lm.tokenizer is None or lm.tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(
            f"{folder}: its token ids come from another tokenizer ({len(tokenizer)} tokens) than model "
            f"{lm.entry.name!r}'s; fix: prepare the data with `lamina data prepare --tokenizer "
            f"{lm.entry.name}`, or pass the text files instead"
        )


def format_table(result: dict[str, Any]) -> str:
    """The terminal table: one line per task and metric (value +- standard error), skipped items, and
    the perplexity figures."""
    lines = [f"{'task':<28} {'metric':<18} {'value':>8}   {'stderr':>7} {'n':>6}"]
    for task, metrics in result["results"].items():
        for name, value in metrics.items():
            if name.endswith("_stderr") or name in ("n", "skipped"):
                continue
            se = metrics.get(f"{name}_stderr", 0.0)
            lines.append(f"{task:<28} {name:<18} {value:>8.4f} +- {se:>7.4f} {int(metrics['n']):>6}")
        if metrics.get("skipped"):
            lines.append(f"{task:<28} {'skipped items':<18} {int(metrics['skipped']):>8}")
    if "perplexity" in result:
        p = result["perplexity"]
        kind = "pseudo-perplexity" if p["pseudo"] else "token_perplexity"
        lines.append(
            f"{'perplexity':<28} {kind:<18} {p['token_perplexity']:>8.4f}   {'':>7} {p['tokens']:>6}"
        )
        lines.append(f"{'perplexity':<28} {'bits_per_byte':<18} {p['bits_per_byte']:>8.4f}")
        lines.append(f"{'perplexity':<28} {'word_perplexity':<18} {p['word_perplexity']:>8.4f}")
    return "\n".join(lines)


def print_skipped(result: dict[str, Any], file: Any = sys.stderr, most: int = 5) -> None:
    """Name the first skipped items of each task (answer index out of range and the like)."""
    for task, reasons in result.get("skipped", {}).items():
        for reason in reasons[:most]:
            print(f"{task}: skipped {reason}", file=file)
        if len(reasons) > most:
            print(f"{task}: ... {len(reasons) - most} more skipped", file=file)
