"""``lamina generate MODEL "prompt"``: one-shot generation with any decoding control, streamed;
``--input prompts.jsonl`` runs a file of prompts as one batch."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from lamina.checkpoint.load import LoadedModel, LoadOptions, load
from lamina.checkpoint.peft import (
    AdapterOptions,
    load_adaptable,
    load_with_adapter,
    own_adapter,
)
from lamina.cli.flags import HelpFormatter, add_config_file, add_fields, values
from lamina.config import GenerationConfig
from lamina.errors import ConfigError
from lamina.fields import build
from lamina.generate.batch import MAX_BATCH_SIZE, generate_batch, read_requests, token_text
from lamina.generate.engine import TokenLogprob
from lamina.generate.speculative import DraftStats, SpeculativeOptions
from lamina.generate.text import Completion, complete, draft_summary, generation_config, print_stream
from lamina.tokenizer import Tokenizer


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``generate`` verb; every ``GenerationConfig`` field becomes a flag."""
    p = sub.add_parser(
        "generate",
        help="generate text from a prompt with any decoding control, streamed",
        description="Continue PROMPT with MODEL and stream the text. Chat models (those with a chat "
        "template) get the prompt as a user message unless --raw is given. Decoding follows the model's own "
        "defaults when its checkpoint has them, else it is greedy unless a sampling control (--temperature, "
        "--top-p, --seed, --n 2, ...) is given. Token counts and speed follow on stderr; --logprobs, "
        "--top-logprobs and --prompt-logprobs print tables there too.",
        epilog='examples: lamina generate smollm2 "Name three colors." --temperature 0.7 --seed 1\n'
        '  lamina generate smollm2 "def add(a, b):" --raw --max-new-tokens 30 --stop \'["\\n\\n"]\'\n'
        "  lamina generate smollm2 --input examples/prompts.jsonl --out results.jsonl",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "model", metavar="MODEL", help="path, models-directory name or packaged name (e.g. smollm2)"
    )
    p.add_argument("prompt", metavar="PROMPT", nargs="?", help="the prompt text ('-' reads standard input)")
    p.add_argument(
        "--input",
        type=Path,
        default=None,
        metavar="FILE",
        help='a JSONL file of requests, one per line: {"prompt": "..."} or {"messages": [...]}, '
        'optionally with any decoding control (e.g. "temperature": 0.7); they run as one batch and '
        "the results are written as JSONL",
    )
    p.add_argument(
        "--out",
        dest="output",
        type=Path,
        default=None,
        metavar="FILE",
        help="where --input results go (default stdout)",
    )
    p.add_argument(
        "--max-batch-size",
        type=int,
        metavar="N",
        default=argparse.SUPPRESS,
        help=f"sequences decoded together with --input (default: {MAX_BATCH_SIZE})",
    )
    p.add_argument("--quiet", action="store_true", help="no token counts and speed on stderr after the text")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--chat", dest="chat", action="store_true", default=None, help="apply the chat template"
    )
    mode.add_argument(
        "--raw", dest="chat", action="store_false", help="use the prompt as-is, no chat template"
    )
    p.add_argument("--system", metavar="TEXT", help="system message (chat mode)")
    add_config_file(p)
    add_model_flags(p)
    add_adapter_flags(p)
    add_control_flags(p)
    add_fields(p, SpeculativeOptions, title="speculative decoding (greedy requests)")
    p.set_defaults(func=run)


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """``--dtype``, ``--weights``, ``--compile``, ``--int4-kernel``, ``--head-topk`` and ``--threads``
    (``LoadOptions``): how MODEL is loaded for inference."""
    add_fields(p, LoadOptions, title="loading the model")


def add_adapter_flags(p: argparse.ArgumentParser) -> None:
    """``--lora PATH`` and ``--merge-lora`` (``AdapterOptions``): a LoRA adapter over MODEL."""
    add_fields(p, AdapterOptions, title="LoRA adapter")


def load_from_args(
    args: argparse.Namespace, model: str | None = None, lora: bool | None = None, adaptable: bool = False
) -> LoadedModel:
    """Load ``model`` (default ``args.model``) with the ``LoadOptions`` given by flags or ``--config``.

    ``lora`` (default: when ``model`` is not given, i.e. for MODEL, not a draft) puts ``--lora``'s
    adapter on it (unmerged unless ``--merge-lora``); a lamina LoRA checkpoint (a folder with
    ``adapter/``, as ``lamina finetune --lora.r ...`` writes) gets its own adapter so unless ``--lora``
    names another. ``adaptable`` loads it so that adapters can be added later (projections kept apart:
    ``lamina.checkpoint.peft.load_adaptable``)."""
    opts = build(LoadOptions, values(args, LoadOptions))
    adapter = build(AdapterOptions, values(args, AdapterOptions))
    if opts.threads is not None:
        import torch

        torch.set_num_threads(opts.threads)
    if opts.compile:
        print(
            "--compile: the first use of a model and weight format compiles (minutes on CPU); later starts "
            "load the compiled decode step from the cache (models it does not cover, e.g. ALiBi or "
            "encoder-decoders, are traced again by torch.compile at each start)",
            file=sys.stderr,
        )
    target = model or args.model
    wanted = model is None if lora is None else lora
    own = own_adapter(target) if wanted else None
    if own is not None and adapter.lora is None and adaptable:
        raise ConfigError(
            f"{target} is a LoRA checkpoint (its weights are the base without {own}): serve the base model "
            f"and add the adapter with --lora-modules NAME={own}"
        )
    if own is not None and adapter.lora is None:
        print(f"lamina: {target} is a LoRA checkpoint: its {own} is applied (--lora)", file=sys.stderr)
        adapter.lora = str(own)
    if adapter.merge_lora and adapter.lora is None:
        raise ConfigError("--merge-lora merges the adapter --lora PATH names: give --lora too")
    if adapter.lora is not None and wanted:
        return load_with_adapter(
            target, adapter.lora, opts.dtype, opts.weights, opts.compile, merge=adapter.merge_lora,
            int4_kernel=opts.int4_kernel, head_topk=opts.head_topk,
        )  # fmt: skip
    if adaptable:
        return load_adaptable(target, opts.dtype, opts.weights, opts.int4_kernel, opts.head_topk)
    return load(
        target, dtype=opts.dtype, weights=opts.weights, compile=opts.compile, int4_kernel=opts.int4_kernel,
        head_topk=opts.head_topk,
    )  # fmt: skip


def add_control_flags(p: argparse.ArgumentParser) -> None:
    """One flag per ``GenerationConfig`` field (``controls_from_args`` collects the ones given)."""
    add_fields(
        p,
        GenerationConfig,
        partial=True,
        title="decoding controls",
        description="every GenerationConfig field (`python -c 'import lamina; help(lamina.GenerationConfig)'` "
        "gives the semantics); unset fields take the model's own defaults (its generation.yaml / "
        "generation_config.json), e.g. --temperature 0.7 --top-p 0.9 --seed 1 --stop '[\"\\n\\n\"]'",
    )


def controls_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The decoding controls given by flags or ``--config``, by ``GenerationConfig`` field name."""
    return values(args, GenerationConfig)


def run(args: argparse.Namespace) -> int:
    """Load the model and stream the continuation to stdout (or run ``--input`` as a batch).

    After the text, stderr gets the logprob tables when asked for (``print_logprobs``) and one line of
    token counts and speed (``Completion.summary``) unless ``quiet``. Choices of ``--n`` > 1 are printed
    one after the other, each under a ``--- choice k/n ---`` line.
    """
    if (args.prompt is None) == (args.input is None):
        raise ConfigError("give a PROMPT or --input prompts.jsonl (one of the two)")
    if args.output is not None and args.input is None:
        raise ConfigError(
            f"--out {args.output} is where --input's results go; for one PROMPT redirect: > FILE"
        )
    controls = controls_from_args(args)
    spec = build(SpeculativeOptions, values(args, SpeculativeOptions))
    lm = load_from_args(args)
    draft = load_from_args(args, spec.draft) if spec.draft is not None else None
    if args.input is not None:
        return run_batch(lm, args, controls, spec, draft)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    cfg = generation_config(lm, None, **controls)
    one = cfg.n == 1
    result = complete(
        lm, prompt, cfg, chat=args.chat, system=args.system, stream=print_stream if one else None,
        draft=draft, speculative_layers=spec.speculative_layers, num_draft_tokens=spec.num_draft_tokens,
    )  # fmt: skip
    if one:
        print()
    else:
        for k, choice in enumerate(result.choices, start=1):
            print(f"--- choice {k}/{cfg.n} ---")
            print(choice.text)
    sys.stdout.flush()
    print_logprobs(result, lm.tokenizer)
    if not args.quiet:
        print(result.summary(), file=sys.stderr)
    return 0


def print_logprobs(result: Completion, tokenizer: Tokenizer | None, file: TextIO | None = None) -> None:
    """The log-probability tables a request asked for, to ``file`` (default stderr): the prompt's tokens
    (``prompt_logprobs``), then each choice's generated tokens (``logprobs``, ``top_logprobs``), one row
    per token with its text, logprob, rank and the most likely alternatives (the raw model distribution,
    as vLLM and OpenAI report it)."""
    out = file or sys.stderr
    if result.prompt_logprobs is not None:
        print("prompt logprobs:", file=out)
        _table(result.prompt_logprobs, tokenizer, out)
    for k, choice in enumerate(result.choices, start=1):
        if choice.logprobs is not None:
            which = f" (choice {k}/{len(result.choices)})" if len(result.choices) > 1 else ""
            print(f"logprobs{which}:", file=out)
            _table(choice.logprobs, tokenizer, out)


def _table(entries: Sequence[TokenLogprob | None], tokenizer: Tokenizer | None, out: TextIO) -> None:
    def text(t: int) -> str:
        return repr(token_text(tokenizer, t))

    rows = [("#", "token", "logprob", "rank", "top alternatives")]
    for i, lp in enumerate(entries):
        if lp is None:
            rows.append((str(i), "-", "", "", "(the first prompt token has no logprob)"))
            continue
        alts = ", ".join(f"{text(t)} {v:.3f}" for t, v in lp.top)
        rows.append((str(i), text(lp.token), f"{lp.logprob:.4f}", str(lp.rank), alts))
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    for r in rows:
        print(
            "  " + "  ".join(v.ljust(w) for v, w in zip(r[:4], widths, strict=True)) + "  " + r[4], file=out
        )


def run_batch(
    lm: LoadedModel,
    args: argparse.Namespace,
    controls: dict[str, Any],
    spec: SpeculativeOptions | None = None,
    draft: LoadedModel | None = None,
) -> int:
    """Run every request of ``args.input`` as one batch (``generate_batch``); write one JSON row per
    choice, in order, to ``args.output`` or stdout. With a draft (``spec``: ``draft`` loaded, or
    ``speculative_layers``) the greedy requests decode speculatively; the acceptance goes to stderr
    unless ``--quiet``."""
    spec = spec or SpeculativeOptions()
    stats: dict[str, DraftStats] = {}
    requests, lines = read_requests(args.input)
    with tqdm(total=None, desc="generating", unit="seq", file=sys.stderr, disable=None) as bar:

        def progress(finished: int, total: int) -> None:
            bar.total = total
            bar.update(finished - bar.n)

        rows = generate_batch(
            lm, requests, chat=args.chat, system=args.system,
            max_batch_size=getattr(args, "max_batch_size", MAX_BATCH_SIZE),
            labels=[f"{args.input}:{n}" for n in lines], progress=progress, draft=draft,
            speculative_layers=spec.speculative_layers, num_draft_tokens=spec.num_draft_tokens, stats=stats,
            **controls,
        )  # fmt: skip
    out = args.output.open("w", encoding="utf-8") if args.output else sys.stdout
    try:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    finally:
        if args.output:
            out.close()
    if "draft" in stats and not args.quiet:
        print(draft_summary(stats["draft"]), file=sys.stderr)
    return 0
