"""Text in, text out: prompts (or chat messages) through the tokenizer, the engine, and back."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

from lamina.checkpoint.load import LoadedModel, load
from lamina.config import GenerationConfig, from_dict, to_dict
from lamina.errors import ConfigError
from lamina.generate.engine import Engine, generate_ids
from lamina.model.transformer import Transformer
from lamina.tokenizer import Tokenizer


def build_prompt_ids(
    lm: LoadedModel,
    prompt: str | Sequence[Mapping[str, Any]],
    chat: bool | None = None,
    system: str | None = None,
) -> list[int]:
    """Token ids for a prompt string or a list of chat messages.

    ``chat=None`` (auto) applies the model's chat template when it has one; a plain string then becomes
    one user message (after ``system``, if given).
    """
    tok = lm.tokenizer
    if tok is None:
        raise ConfigError(f"model {lm.entry.name!r} has no tokenizer; give token ids to the engine instead")
    use_chat = (tok.chat_template is not None) if chat is None else chat
    if isinstance(prompt, str) and not use_chat:
        return tok.encode(prompt)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system is not None:
        messages = [{"role": "system", "content": system}, *messages]
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


def stream_text(
    model: str | LoadedModel,
    prompt: str | Sequence[Mapping[str, Any]],
    config: GenerationConfig | None = None,
    chat: bool | None = None,
    system: str | None = None,
    **controls: Any,
) -> Iterator[str]:
    """Yield the continuation of ``prompt`` as text deltas, as it is decoded.

    Same arguments as ``generate``. A delta never splits a UTF-8 character, and with stop strings the
    text that may be the start of one is held back until it is known not to be; the deltas concatenate
    to what ``generate`` returns.
    """
    lm = load(model) if isinstance(model, str) else model
    ids = build_prompt_ids(lm, prompt, chat=chat, system=system)
    cfg = generation_config(lm, config, **controls)
    if cfg.num_beams > 1:  # beam search knows its best sequence only at the end
        from lamina.generate.beam import beam_search

        assert lm.tokenizer is not None
        best = beam_search(lm.model, [ids], replace(cfg, n=1), lm.generation.eos_token_ids)[0][0]
        yield lm.tokenizer.decode(best.tokens, skip_special_tokens=True)
        return
    if cfg.n != 1:
        raise ConfigError(f"n={cfg.n}: streaming text gives one sequence; use generate_ids for n > 1")
    engine = Engine(lm.model, lm.tokenizer, lm.generation.eos_token_ids, max_batch_size=1)
    engine.submit(ids, cfg)
    while engine.has_work():
        for delta in engine.step():
            if delta.text:
                yield delta.text


def generate(
    model: str | LoadedModel,
    prompt: str | Sequence[Mapping[str, Any]],
    config: GenerationConfig | None = None,
    chat: bool | None = None,
    system: str | None = None,
    stream: Callable[[str], None] | None = None,
    **controls: Any,
) -> str:
    """Generate a continuation of ``prompt`` with ``model`` (a name, path or loaded model).

    Decoding controls come from ``config``, else the model's defaults, with ``controls`` (any
    ``GenerationConfig`` field, e.g. ``temperature=0.7, top_p=0.9, seed=1``) on top; with none given the
    decoding is greedy. ``stream`` receives text deltas as they are decoded (never splitting a UTF-8
    character); ``stream_text`` gives them as an iterator instead.
    """
    text = ""
    for delta in stream_text(model, prompt, config, chat=chat, system=system, **controls):
        text += delta
        if stream is not None:
            stream(delta)
    return text


def generation_config(
    lm: LoadedModel, config: GenerationConfig | None = None, **controls: Any
) -> GenerationConfig:
    """``config`` (or greedy with the model's max_new_tokens) with ``controls`` applied, validated."""
    base = config or GenerationConfig(temperature=0.0, max_new_tokens=lm.generation.max_new_tokens)
    if (
        "temperature" not in controls
        and config is None
        and any(k in controls for k in ("top_k", "top_p", "min_p", "typical_p", "seed", "n", "mirostat"))
    ):
        controls["temperature"] = 1.0  # asking for a sampling control asks for sampling
    return from_dict(
        GenerationConfig, {**to_dict(base), **{k: v for k, v in controls.items() if v is not None}}
    )


def print_stream(delta: str) -> None:
    """A ``stream`` callback that writes to stdout as text arrives."""
    sys.stdout.write(delta)
    sys.stdout.flush()


def sample_text(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int = 40,
    seed: int | None = None,
) -> str:
    """Prompt + a sampled continuation (temperature, top-k, seed) from a bare model and tokenizer."""
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = generate_ids(model, [ids], cfg, eos)[0].tokens
    return prompt + tokenizer.decode(out, skip_special_tokens=True)
