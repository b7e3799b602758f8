"""``lamina VERB ...``: one thin module per verb over the public Python API."""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType
from typing import Any, NoReturn

from lamina import __version__
from lamina.cli.flags import (
    bool_typos,
    normalize_argv,
    print_flat_config,
    unknown_arguments,
    verb_parser,
)
from lamina.errors import LaminaError

# verb -> its one-line help in `lamina --help`; the verb's module is lamina.cli.<verb> ("-" -> "_").
# Only the verb being run is imported (its module imports torch and its config classes): `lamina --help`
# and `lamina --version` start without torch. A test checks each line equals the verb's own help.
VERBS = {
    "models": "list models available on this machine (models directory and installed packages)",
    "inspect": "show a model's config, parameter count, dtype, size on disk and tokenizer",
    "convert": "convert a model (lamina, HF folder, GGUF) to a lamina or HF checkpoint folder or a GGUF file",
    "generate": "generate text from a prompt with any decoding control, streamed",
    "chat": "chat with a model interactively (streaming, with history)",
    "embed": "embed texts (one per line) as vectors with an encoder such as minilm",
    "fill-mask": "predict the tokens behind [MASK] with a masked-LM encoder",
    "ask": "answer a question from an index (lamina index) with numbered citations, streamed",
    "tokenizer": "train a BPE/Unigram tokenizer; encode, decode and count tokens",
    "data": "prepare training data: tokenize text into memory-mapped token shards",
    "pretrain": "pretrain a language model from a run config (every field is a flag)",
    "finetune": "fine-tune a task head on labeled data, or a language model on chat data (--task sft), a "
    "reward model (--task reward), DPO (--task dpo), GRPO (--task grpo) or an encoder-decoder on source/target "
    "pairs (--task seq2seq)",
    "score": "score prompt/completion pairs (JSONL) with a reward model (finetune --task reward)",
    "tune": "search hyperparameters (any config field) with Optuna: grid, random or TPE, with pruning",
    "eval": "score a model on benchmarks (MMLU, ARC, HellaSwag, TruthfulQA, WiC, BIG-bench, GSM8K) or "
    "perplexity; compare two results",
    "index": "index documents (folders, files, globs, or the built-in stdlib docs) for lamina ask",
    "serve": "serve models over an OpenAI-compatible HTTP API (completions, chat, embeddings)",
    "plan": "plan a training run: compute-optimal parameters and tokens for a FLOP budget (Chinchilla), a "
    "config that size, its memory",
    "scaling": "fit scaling laws to your own runs: train a grid of sizes x tokens, fit L(N, D), predict",
    "explain": "look inside a model on a text: attention maps, logit lens and per-token surprisal (PNGs)",
    "demo": "train a small GPT on the embedded corpus (Python's stdlib) for a few minutes and sample it",
    "diffusion": "train a small image diffusion model (DDPM/DDIM) and sample, inpaint, upscale, edit or export "
    "synthetic labeled images",
}


# words other tools use for a lamina verb (llama.cpp, HF, Ollama): `lamina train` points at these
OTHER_WORDS = {
    "train": "pretrain (a new model) or finetune (from a model)",
    "run": "generate or chat",
    "complete": "generate",
    "server": "serve",
    "quantize": "convert (--to gguf, or generate --weights int4)",
    "export": "convert",
    "perplexity": "eval (--perplexity FILE)",
    "list": "models",
    "show": "inspect",
}


def unknown_verb(word: str) -> str:
    """The one-line refusal of ``word`` as a verb, naming the verb meant (``did you mean``)."""
    import difflib

    close = difflib.get_close_matches(word, VERBS, n=2, cutoff=0.6)
    hint = OTHER_WORDS.get(word) or (" or ".join(close) if close else None)
    meant = f"; did you mean {hint}?" if hint else f"; verbs: {', '.join(VERBS)}"
    return f"lamina: error: unknown verb {word!r}{meant} (`lamina --help` lists every verb)"


def verb_module(verb: str) -> ModuleType:
    """The module of ``verb`` (``fill-mask`` -> ``lamina.cli.fill_mask``), imported now."""
    return importlib.import_module("lamina.cli." + verb.replace("-", "_"))


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error on one line (a verb's full usage lists hundreds of flags), and a verb's
    positionals free to come after its flags (``lamina generate MODEL --max-new-tokens 20 "prompt"``, as
    ``llama-cli`` and most CLIs take them: plain argparse stops filling MODEL [PROMPT] at the first flag
    and refuses the prompt after it)."""

    _intermixing = False
    intermix = True  # parse turns it off, on the verb's parser only, for a boolean flag's bad value

    def parse_known_args(  # type: ignore[override]  # argparse's stub overloads on namespace's type
        self, args: Any = None, namespace: Any = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if self._intermixing or not self._can_intermix():
            return super().parse_known_args(args, namespace)
        self._intermixing = True  # parse_known_intermixed_args calls parse_known_args twice
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False

    def _can_intermix(self) -> bool:
        """argparse intermixes a parser without sub-commands or catch-all positionals (the verbs')."""
        return self.intermix and not any(
            isinstance(a, argparse._SubParsersAction) or a.nargs in (argparse.PARSER, argparse.REMAINDER)
            for a in self._actions
        )

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists every flag)\n")


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The ``lamina`` argument parser with every verb registered (``verb`` given: that verb in full and
    the others by name and help only, which imports nothing else)."""
    parser = Parser(
        prog="lamina",
        description="lamina: build, train, adapt, run and serve transformer language models.",
        epilog="Run `lamina VERB --help` for a verb's options. MODEL is a path, a name in the models "
        "directory, or a packaged short name such as `smollm2` (see `lamina models`).",
    )
    parser.add_argument("--version", action="version", version=f"lamina {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name, help in VERBS.items():
        if verb is None or name == verb:
            verb_module(name).register(sub)
        else:
            sub.add_parser(name, help=help, add_help=False)
    return parser


def parse(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """``argv`` parsed as ``main`` does: flags normalized, positionals anywhere, and a usage error (exit 2)
    for anything left over.

    A word right after a boolean flag given bare that could be the flag's value (``--compile maybe``:
    ``could_be_bool``) stays left over, for ``unknown_arguments`` to name as the flag's bad value, instead
    of filling an optional positional by intermixing; any other word (``--ignore-eos "Tell me a story"``)
    is a positional, as it is after any other flag (``--max-new-tokens 5 "hi"``).
    """
    argv = normalize_argv(parser, argv)
    verb = verb_parser(parser, argv)
    intermix = getattr(verb, "intermix", True)
    verb.intermix = not bool_typos(parser, argv)  # type: ignore[attr-defined]  # a Parser's (this parser's)
    try:
        args, extra = parser.parse_known_args(argv)
    finally:
        verb.intermix = intermix  # type: ignore[attr-defined]
    if extra:
        unknown_arguments(parser, argv, extra)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse ``argv`` and run the verb; a ``LaminaError`` prints one line and exits 1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    if "--debug" in argv[1:cut]:  # `lamina generate ... --debug`: the top-level flag, wherever it is given
        argv = ["--debug", *(a for i, a in enumerate(argv) if a != "--debug" or i > cut)]
    verb = next((a for a in argv if not a.startswith("-")), "")  # the first word (top-level flags take none)
    if verb and verb not in VERBS:
        print(unknown_verb(verb), file=sys.stderr)
        return 2
    args = parse(build_parser(verb), argv)
    said = " ".join(w for w in (args.verb, getattr(args, "action", None)) if w)
    try:
        with warnings.catch_warnings():
            if not args.debug:  # a warning is one line, as an error is (not Python's file:line + source line)
                warnings.showwarning = lambda message, category, *_, **__: print(
                    f"lamina {said}: warning: {' '.join(str(message).split())}", file=sys.stderr
                )
            if getattr(args, "print_config", False) and getattr(args, "_lamina_sources", None):
                print_flat_config(args)  # a one-config verb: the same for every verb, before any work
                return 0
            return int(args.func(args) or 0)
    except LaminaError as e:
        if args.debug:
            raise
        print(f"lamina {said}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C: 130; a trainer stopped by SIGTERM says 143 (128 + 15)
        print("interrupted", file=sys.stderr)
        return int(getattr(e, "exit_code", 130))
    except BrokenPipeError:  # `lamina ... | head`
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
