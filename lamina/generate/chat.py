"""A chat session: user turns in, streamed replies out, the conversation kept as history.

    from lamina.generate.chat import chat_loop
    lines = iter(["Hi!", "What did I just say?"])
    history = chat_loop(lm, lambda: next(lines, None), print)

The terminal's ``lamina chat`` is this loop reading ``input()`` and writing to stdout; a notebook or a test
drives it with any ``read`` / ``write``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from lamina.checkpoint.load import LoadedModel
from lamina.config import GenerationConfig, from_dict
from lamina.errors import ConfigError
from lamina.generate.engine import require_generative
from lamina.generate.speculative import DraftStats, SpeculativeOptions
from lamina.generate.text import complete, generation_config, model_defaults, resolve_draft
from lamina.model.transformer import Transformer

COMMANDS = (
    "commands: /reset or /clear (forget the conversation), /system TEXT (set the system prompt), "
    "/exit, /quit or /bye"
)

CHAT_DEFAULTS: dict[str, Any] = {
    "temperature": 0.7,
    "top_p": 0.9,
    "min_p": 0.05,
    "repetition_penalty": 1.1,
    "repetition_penalty_last_n": 64,
    "max_new_tokens": 512,
}
"""Decoding controls of a chat with a model whose checkpoint has no decoding defaults of its own (GGUF
files and most HF folders). Greedy decoding makes small chat models repeat themselves (SmolLM2-135M loops
within a reply); these are llama.cpp's / Ollama's kind of chat defaults: moderate temperature, nucleus and
min-p truncation, a mild repetition penalty over the last 64 tokens, and a budget of 512 tokens."""


def chat_config(lm: LoadedModel, config: GenerationConfig | None = None, **controls: Any) -> GenerationConfig:
    """The controls chat replies use: ``config``, else the checkpoint's own defaults
    (``model_defaults``), else ``CHAT_DEFAULTS`` (with the model's eos ids); ``controls`` on top.

    ``temperature=0`` among the controls makes replies greedy (the chat defaults' repetition penalty
    still applies; give ``repetition_penalty=1`` for plain greedy). Raises ``ConfigError`` as
    ``generation_config`` does.
    """
    base = config or model_defaults(lm)
    if base is None:
        base = from_dict(GenerationConfig, {"eos_token_ids": lm.generation.eos_token_ids, **CHAT_DEFAULTS})
        if lm.generation.max_new_tokens != GenerationConfig().max_new_tokens:  # the checkpoint's budget
            base = replace(base, max_new_tokens=lm.generation.max_new_tokens)
    return generation_config(lm, base, **controls)  # controls over base, checked (and warned of) there


def chat_loop(
    lm: LoadedModel,
    read: Callable[[], str | None],
    write: Callable[[str], None],
    system: str | None = None,
    config: GenerationConfig | None = None,
    draft: str | LoadedModel | Transformer | None = None,
    speculative_layers: int | None = None,
    num_draft_tokens: int = SpeculativeOptions.num_draft_tokens,
    stats: dict[str, DraftStats] | None = None,
    **controls: Any,
) -> list[dict[str, str]]:
    """Read user turns with ``read`` (None ends), stream replies with ``write``; return the history.

    Lines starting with ``/`` are commands: ``/reset``, ``/system TEXT``, ``/exit``. Replies use
    ``chat_config(lm, config, **controls)``. A reply cut by its budget ends with a note saying so
    (``[reply cut at max_new_tokens=N]``, or the context window when that is full). A
    ``KeyboardInterrupt`` (Ctrl-C) while a reply is streamed stops that reply and the session goes on:
    the partial reply stays in the history, as the user saw it (a turn interrupted before any text is
    dropped). A turn the model cannot take (the conversation outgrew the context window) is refused with
    a note and dropped; ``/reset`` starts over. ``draft`` / ``speculative_layers`` / ``num_draft_tokens``
    decode greedy replies speculatively (as ``lamina.generate``; the draft is loaded once); ``stats``,
    when given, receives the draft's counts over the session under "draft". Raises ``ConfigError`` at
    once for a model that cannot chat (an encoder, or no chat template) or invalid controls.
    """
    require_generative(lm.model.config, lm.entry.name)
    if lm.tokenizer is None or lm.tokenizer.chat_template is None:
        does = (
            "maps one source text to its output"
            if lm.model.config.arch == "encoder-decoder"
            else "continues plain text"
        )
        import shlex

        # the path the user gave (a checkpoint's folder name alone, "last", would not load)
        model = shlex.quote(str(lm.entry.path) if lm.entry.source == "path" else lm.entry.name)
        raise ConfigError(
            f"model {lm.entry.name!r} has no chat template; `lamina generate {model} PROMPT` {does}"
        )
    cfg = chat_config(lm, config, **controls)
    one_reply = {"n": cfg.n > 1, "num_beams": cfg.num_beams > 1, "logprobs": cfg.logprobs,
                 "top_logprobs": cfg.top_logprobs > 0, "prompt_logprobs": cfg.prompt_logprobs is not None}  # fmt: skip
    if asked := [name for name, on in one_reply.items() if on]:
        raise ConfigError(
            f"chat streams one reply per turn: {', '.join(asked)} belong to `lamina generate` "
            "(which prints every choice and the logprob tables)"
        )
    drafter = resolve_draft(lm, draft, speculative_layers)
    total = DraftStats()
    if stats is not None and drafter is not None:
        stats["draft"] = total
    context = lm.model.config.max_seq_len
    history: list[dict[str, str]] = []
    parts: list[str] = []  # the reply streamed so far

    def show(delta: str) -> None:
        write(delta)
        parts.append(delta)  # after write: a Ctrl-C inside write keeps only what was shown

    while (line := read()) is not None:
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, rest = line.partition(" ")
            if cmd in ("/exit", "/quit", "/bye"):  # /bye, /clear: what Ollama's chat takes
                break
            if cmd in ("/reset", "/clear"):
                history.clear()
                write("(conversation reset)\n")
            elif cmd == "/system":
                system = rest.strip() or None
                write(f"(system prompt {'set' if system else 'cleared'})\n")
            else:
                write(f"unknown command {cmd!r}; {COMMANDS}\n")
            continue
        turn = [*history, {"role": "user", "content": line}]
        messages = ([{"role": "system", "content": system}] if system else []) + turn
        parts.clear()
        try:
            result = complete(
                lm, messages, cfg, chat=True, stream=show, draft=drafter, num_draft_tokens=num_draft_tokens
            )
        except KeyboardInterrupt:
            write("\n[reply interrupted]\n")
            if parts:
                history = [*turn, {"role": "assistant", "content": "".join(parts)}]
            continue
        except ConfigError as e:
            write(f"[{e}; /reset starts a new conversation]\n")
            continue
        reply = result.choices[0]
        if result.draft is not None:
            total.proposed += result.draft.proposed
            total.accepted += result.draft.accepted
        write("\n")
        if reply.finish_reason == "length":
            if result.prompt_tokens + len(reply.tokens) >= context:
                write(f"[reply cut: the context window ({context} tokens) is full; /reset starts over]\n")
            else:
                write(f"[reply cut at max_new_tokens={cfg.max_new_tokens}]\n")
        history = [*turn, {"role": "assistant", "content": reply.text or ""}]
    return history
