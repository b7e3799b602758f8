"""``lamina generate MODEL "prompt"``: one-shot generation with any decoding control, streamed;
``--input prompts.jsonl`` runs a file of prompts as one batch."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lamina.checkpoint.load import LoadedModel, LoadOptions, load
from lamina.cli.flags import add_config_file, add_fields, values
from lamina.config import GenerationConfig
from lamina.errors import ConfigError
from lamina.fields import build
from lamina.generate.engine import Engine, Sequence_
from lamina.generate.text import build_prompt_ids, generate, generation_config, print_stream


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``generate`` verb; every ``GenerationConfig`` field becomes a flag."""
    p = sub.add_parser(
        "generate",
        help="generate text from a prompt with any decoding control, streamed",
        description="Continue PROMPT with MODEL and stream the text. Chat models (those with a chat "
        "template) get the prompt as a user message unless --raw is given. Greedy unless a sampling "
        "control (--temperature, --top-p, --seed, ...) is given.",
    )
    p.add_argument(
        "model", metavar="MODEL", help="path, models-directory name or packaged name (e.g. smollm2)"
    )
    p.add_argument("prompt", metavar="PROMPT", nargs="?", help="the prompt text ('-' reads standard input)")
    p.add_argument(
        "--input",
        type=Path,
        default=None,
        help='a JSONL file of requests, one per line: {"prompt": "..."} or {"messages": [...]}, '
        'optionally with any decoding control (e.g. "temperature": 0.7); they run as one batch and '
        "the results are written as JSONL",
    )
    p.add_argument("--output", type=Path, default=None, help="where --input results go (default stdout)")
    p.add_argument(
        "--max-batch-size", type=int, default=16, help="sequences decoded together with --input (16)"
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--chat", dest="chat", action="store_true", default=None, help="apply the chat template"
    )
    mode.add_argument(
        "--raw", dest="chat", action="store_false", help="use the prompt as-is, no chat template"
    )
    p.add_argument("--system", default=None, help="system message (chat mode)")
    add_config_file(p)
    add_model_flags(p)
    add_control_flags(p)
    p.set_defaults(func=run)


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """``--dtype``, ``--weights`` and ``--compile`` (``LoadOptions``): how MODEL is loaded for inference."""
    add_fields(p, LoadOptions, title="loading the model")


def load_from_args(args: argparse.Namespace, model: str | None = None) -> LoadedModel:
    """Load ``model`` (default ``args.model``) with the ``LoadOptions`` given by flags or ``--config``."""
    opts = build(LoadOptions, values(args, LoadOptions))
    if opts.compile:
        print(
            "--compile: the first prompt of each new shape compiles first (minutes on CPU)", file=sys.stderr
        )
    return load(model or args.model, dtype=opts.dtype, weights=opts.weights, compile=opts.compile)


def add_control_flags(p: argparse.ArgumentParser) -> None:
    """One flag per ``GenerationConfig`` field (``controls_from_args`` collects the ones given)."""
    add_fields(
        p,
        GenerationConfig,
        title="decoding controls",
        description="every GenerationConfig field (`python -c 'import lamina; help(lamina.GenerationConfig)'` "
        "gives the semantics); unset fields take the model's own defaults (its generation.yaml / "
        "generation_config.json), e.g. --temperature 0.7 --top-p 0.9 --seed 1 --stop '[\"\\n\\n\"]'",
    )


def controls_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The decoding controls given by flags or ``--config``, by ``GenerationConfig`` field name."""
    return values(args, GenerationConfig)


def run(args: argparse.Namespace) -> int:
    """Load the model and stream the continuation to stdout (or run ``--input`` as a batch)."""
    if (args.prompt is None) == (args.input is None):
        raise ConfigError("give a PROMPT or --input prompts.jsonl (one of the two)")
    controls = controls_from_args(args)
    lm = load_from_args(args)
    if args.input is not None:
        return run_batch(lm, args, controls)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    generate(lm, prompt, chat=args.chat, system=args.system, stream=print_stream, **controls)
    print()
    return 0


def read_requests(path: Path) -> list[dict[str, Any]]:
    """The requests of a JSONL file, each with a "prompt" string or a "messages" list."""
    if not path.is_file():
        raise ConfigError(f"--input {path}: no such file")
    requests = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            req = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(req, dict) or not (isinstance(req.get("prompt"), str) or "messages" in req):
            raise ConfigError(
                f'{path}:{i}: each line must be an object with "prompt" (a string) or "messages"'
            )
        requests.append(req)
    if not requests:
        raise ConfigError(f"--input {path}: no requests in the file")
    return requests


def _beam_sequences(lm: LoadedModel, ids: list[int], cfg: GenerationConfig, index: int) -> list[Sequence_]:
    """A beam-search request's ``cfg.n`` best beams, as engine sequences."""
    from lamina.generate.beam import beam_search

    assert lm.tokenizer is not None
    beams = beam_search(lm.model, [ids], cfg, lm.generation.eos_token_ids)[0]
    return [
        Sequence_(index, b.tokens, b.finish_reason, lm.tokenizer.decode(b.tokens, skip_special_tokens=True),
                  index=k, prompt_tokens=len(ids))
        for k, b in enumerate(beams)
    ]  # fmt: skip


def run_batch(lm: LoadedModel, args: argparse.Namespace, controls: dict[str, Any]) -> int:
    """Run every request of ``args.input`` through one engine; write one JSON result per line, in order."""
    requests = read_requests(args.input)
    engine = Engine(lm.model, lm.tokenizer, lm.generation.eos_token_ids, max_batch_size=args.max_batch_size)
    submitted = []
    for i, req in enumerate(requests, start=1):
        own = {k: v for k, v in req.items() if k not in ("prompt", "messages", "id")}
        try:
            cfg = generation_config(lm, None, **{**controls, **own})
            prompt = req["messages"] if "messages" in req else req["prompt"]
            ids = build_prompt_ids(lm, prompt, chat=args.chat, system=args.system)
            if cfg.num_beams > 1:  # beam search runs on its own, not in the sampling batch
                submitted.append((req, _beam_sequences(lm, ids, cfg, i - 1)))
            else:
                submitted.append((req, engine.submit(ids, cfg)))
        except ConfigError as e:
            raise ConfigError(f"{args.input}:{i}: {e}") from None
    total = sum(len(seqs) for _, seqs in submitted)
    out = args.output.open("w", encoding="utf-8") if args.output else sys.stdout
    try:
        with tqdm(total=total, desc="generating", unit="seq", file=sys.stderr, disable=None) as bar:
            while engine.has_work():
                bar.update(sum(1 for d in engine.step() if d.finished))
        for i, (req, seqs) in enumerate(submitted):
            for seq in seqs:
                row: dict[str, Any] = {"index": i, "id": req.get("id", i), "text": seq.text}
                if len(seqs) > 1:
                    row["n"] = seq.index
                row |= {
                    "finish_reason": seq.finish_reason,
                    "prompt_tokens": seq.prompt_tokens,
                    "completion_tokens": len(seq.tokens),
                }
                if seq.logprobs is not None:
                    row["logprobs"] = [lp.logprob for lp in seq.logprobs]
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
    finally:
        if args.output:
            out.close()
    return 0
