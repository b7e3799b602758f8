"""Text in, text out: prompts (or chat messages) through the tokenizer, the engine, and back."""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from lamina.checkpoint.load import LoadedModel, load
from lamina.config import LOGITS_PROCESSORS, PICK_FIELDS, GenerationConfig, from_dict, to_dict
from lamina.errors import ConfigError
from lamina.generate.engine import Engine, Sequence_, TokenLogprob, generate_ids, require_generative
from lamina.generate.speculative import DraftStats, SpeculativeOptions, draft_model
from lamina.model.transformer import Transformer
from lamina.tokenizer import Tokenizer


def build_prompt_ids(
    lm: LoadedModel,
    prompt: str | Sequence[Mapping[str, Any]],
    chat: bool | None = None,
    system: str | None = None,
    split_special_tokens: bool = False,
) -> list[int]:
    """Token ids for a prompt string or a list of chat messages.

    ``chat=None`` (auto) applies the model's chat template when it has one; a plain string then becomes
    one user message (after ``system``, if given). In a chat only the template makes control tokens:
    text in the messages that spells one (``"<|im_end|>"``) stays text (``Tokenizer.apply_chat_template``).
    A raw prompt (``chat=False``) is encoded as written, special tokens included, unless
    ``split_special_tokens`` (then they are plain text too). An encoder-decoder's raw prompt is its
    source, encoded as seq2seq training encodes one (``lamina.data.pairs``): its tokens, then eos.
    """
    tok = lm.tokenizer
    if tok is None:
        raise ConfigError(f"model {lm.entry.name!r} has no tokenizer; give token ids to the engine instead")
    use_chat = (tok.chat_template is not None) if chat is None else chat
    if isinstance(prompt, str) and not use_chat:
        if lm.model.config.arch != "encoder-decoder":
            return tok.encode(prompt, split_special_tokens=split_special_tokens)
        ids = tok.encode(prompt, add_special_tokens=False, split_special_tokens=split_special_tokens)
        eos = tok.eos_token_id
        return [*ids, eos] if eos is not None and ids[-1:] != [eos] else ids
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system is not None:
        messages = [{"role": "system", "content": system}, *messages]
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


@dataclass
class Completion:
    """What one prompt gave: its ``n`` choices (or the n best beams), with token counts and timing.

    ``choices[k].text`` is choice k's text, ``.tokens`` its new token ids (the eos / stop token that
    ended it is not among them), ``.finish_reason`` "stop" or "length", ``.logprobs`` one
    ``TokenLogprob`` per generated token when ``config.logprobs``. ``prompt_logprobs`` has one entry per
    prompt token (None for the first) when ``config.prompt_logprobs`` is set. ``prefill_seconds`` is the
    wall time of the prompt's forward pass and the first token (0 when the prompt did not run:
    ``max_new_tokens=0`` without prompt logprobs, ``prompt_ran``); ``decode_seconds`` the rest, in which
    ``decode_tokens`` tokens (over all choices) were produced. ``draft`` counts the draft tokens
    proposed and accepted when the engine decoded speculatively.
    """

    choices: list[Sequence_]
    prompt_tokens: int
    config: GenerationConfig
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_tokens: int = 0
    draft: DraftStats | None = None  # speculative decoding's proposed / accepted draft tokens

    @property
    def text(self) -> str:
        """The first choice's text."""
        return self.choices[0].text or ""

    @property
    def prompt_ran(self) -> bool:
        """Whether the prompt's forward ran: a token was to be generated (even when the first was an eos,
        which ``tokens`` leaves out) or the prompt's logprobs were asked for."""
        return self.config.max_new_tokens > 0 or self.config.prompt_logprobs is not None

    @property
    def completion_tokens(self) -> int:
        """Generated tokens over all choices."""
        return sum(len(c.tokens) for c in self.choices)

    def summary(self) -> str:
        """One line of counts and speed, as llama.cpp prints after a generation, e.g.
        ``prompt 31 tokens, 0.21 s (148 tokens/s) | generated 20 tokens, 1.19 s (16.0 tokens/s)``.

        The prompt rate covers the prefill (which also picks the first token); the generation rate the
        decode steps after it. A choice cut by the budget adds ``cut at max_new_tokens=N``, one cut
        sooner by a full context window (the model's ``max_seq_len``) ``cut by the context window``;
        speculative decoding adds its acceptance rate (``draft accepted 41/60 (68%)``).
        """
        n = len(self.choices)
        head = f"prompt {self.prompt_tokens} tokens, {self.prefill_seconds:.2f} s"
        if self.prefill_seconds > 0 and self.prompt_ran:
            head += f" ({self.prompt_tokens / self.prefill_seconds:.0f} tokens/s)"
        tokens = "token" if self.completion_tokens == 1 else "tokens"
        gen = f"generated {self.completion_tokens} {tokens}" + (f" in {n} choices" if n > 1 else "")
        gen += f", {self.prefill_seconds + self.decode_seconds:.2f} s"
        if self.decode_seconds > 0 and self.decode_tokens:
            gen += f" ({self.decode_tokens / self.decode_seconds:.1f} tokens/s)"
        budget = self.config.max_new_tokens
        cut = [c for c in self.choices if c.finish_reason == "length"]
        # "length" before max_new_tokens tokens: the context window filled up first
        full = sum(len(c.tokens) < budget for c in cut)
        for count, why in (
            (len(cut) - full, f"cut at max_new_tokens={budget}"),
            (full, "cut by the context window"),
        ):
            if count:
                gen += f"; {('all' if count == n else str(count)) + ' ' if n > 1 else ''}{why}"
        if self.draft is not None:
            gen += " | " + draft_summary(self.draft)
        return f"{head} | {gen}"


def draft_summary(stats: DraftStats) -> str:
    """``draft accepted 41/60 (68%)``: speculative decoding's acceptance, for the CLI's stderr line."""
    if not stats.proposed:
        return "draft proposed nothing (speculative decoding applies to greedy requests without logprobs)"
    return f"draft accepted {stats.accepted}/{stats.proposed} ({stats.acceptance_rate:.0%})"


def complete(
    model: str | LoadedModel,
    prompt: str | Sequence[Mapping[str, Any]],
    config: GenerationConfig | None = None,
    chat: bool | None = None,
    system: str | None = None,
    stream: Callable[[str], None] | None = None,
    draft: str | LoadedModel | Transformer | None = None,
    speculative_layers: int | None = None,
    num_draft_tokens: int = SpeculativeOptions.num_draft_tokens,
    **controls: Any,
) -> Completion:
    """Generate from ``prompt`` and return every choice with its tokens, logprobs, counts and timing.

    Same arguments as ``generate``; ``n`` > 1 (sampled, greedy or the n best of ``num_beams``) gives n
    choices. ``stream`` receives the first choice's text deltas as they are decoded (beam search knows
    its best beam only at the end: one delta then). Raises ``ConfigError`` for controls the model cannot
    take (token ids outside its vocabulary, a prompt over its context window) and when generation fails
    at a step (e.g. every token banned), for a model that cannot generate (an encoder), and for a draft
    that does not fit it (``resolve_draft``).
    """
    lm = _loaded(model)
    ids = build_prompt_ids(lm, prompt, chat=chat, system=system)
    cfg = generation_config(lm, config, **controls)
    drafter = resolve_draft(lm, draft, speculative_layers)
    engine = Engine(
        lm.model, lm.tokenizer, lm.generation.eos_token_ids, max_batch_size=max(cfg.n, cfg.num_beams),
        draft=drafter, num_draft_tokens=num_draft_tokens,
    )  # fmt: skip
    start = time.perf_counter()
    seqs = engine.submit(ids, cfg)
    prefill, decode_tokens = None, 0
    while engine.has_work():
        deltas = engine.step(decode=prefill is not None)  # the first step only prefills
        if prefill is None:
            prefill = time.perf_counter() - start
        else:
            decode_tokens += sum(d.token is not None for d in deltas)
        if stream is not None:
            for d in deltas:
                if d.seq.index == 0 and d.text:
                    stream(d.text)
    total, prefill = time.perf_counter() - start, prefill or 0.0
    if cfg.num_beams > 1:  # every step decoded num_beams rows
        decode_tokens = max(max(len(s.tokens) for s in seqs) - 1, 0) * cfg.num_beams
    failed = next((s for s in seqs if s.finish_reason == "error"), None)
    if failed is not None:
        raise ConfigError(f"generation stopped at token {len(failed.tokens)}: {failed.error}")
    done = Completion(
        seqs, len(ids), cfg, seqs[0].prompt_logprobs, prefill, total - prefill, decode_tokens,
        engine.draft_stats,
    )  # fmt: skip
    if not done.prompt_ran:  # the first step only admitted (and finished) the request: no prefill time
        done.prefill_seconds, done.decode_seconds = 0.0, total
    return done


def resolve_draft(
    lm: LoadedModel,
    draft: str | LoadedModel | Transformer | None = None,
    speculative_layers: int | None = None,
) -> Transformer | None:
    """The draft model for speculative decoding of ``lm``: ``draft`` (a name or path, loaded with its
    default options; a ``LoadedModel``; a ``Transformer``) or ``lm``'s own first ``speculative_layers``
    layers (``layer_skip_draft``); None when neither is given. Raises ``ConfigError`` when both are given,
    for a layer count outside 1..n_layers, and for a draft whose vocabulary differs from ``lm``'s."""
    if draft is None and speculative_layers is None:
        return None
    if draft is not None and speculative_layers is not None:
        raise ConfigError(
            "give draft= or speculative_layers= (a draft model or the target's first K layers), not both"
        )
    loaded = load(draft) if isinstance(draft, str) else draft
    model = loaded.model if isinstance(loaded, LoadedModel) else loaded
    if model is not None:
        require_generative(model.config, "draft")
    return draft_model(lm.model, model, speculative_layers)


def stream_text(
    model: str | LoadedModel,
    prompt: str | Sequence[Mapping[str, Any]],
    config: GenerationConfig | None = None,
    chat: bool | None = None,
    system: str | None = None,
    draft: str | LoadedModel | Transformer | None = None,
    speculative_layers: int | None = None,
    num_draft_tokens: int = SpeculativeOptions.num_draft_tokens,
    **controls: Any,
) -> Iterator[str]:
    """Yield the continuation of ``prompt`` as text deltas, as it is decoded.

    Same arguments as ``generate``. A delta never splits a UTF-8 character, and with stop strings the
    text that may be the start of one is held back until it is known not to be; the deltas concatenate
    to what ``generate`` returns (beam search: the best beam's text, at the end). Raises ``ConfigError``
    as ``complete`` does.
    """
    lm = _loaded(model)
    ids = build_prompt_ids(lm, prompt, chat=chat, system=system)
    cfg = generation_config(lm, config, **controls)
    if cfg.num_beams > 1:  # the best beam
        cfg = replace(cfg, n=1)
    if cfg.n != 1:
        raise ConfigError(
            f"n={cfg.n}: a text stream carries one sequence; lamina.complete(...) returns all {cfg.n} choices"
        )
    engine = Engine(
        lm.model, lm.tokenizer, lm.generation.eos_token_ids, max_batch_size=cfg.num_beams,
        draft=resolve_draft(lm, draft, speculative_layers), num_draft_tokens=num_draft_tokens,
    )  # fmt: skip
    (seq,) = engine.submit(ids, cfg)
    while engine.has_work():
        for delta in engine.step():
            if delta.text:
                yield delta.text
    if seq.finish_reason == "error":
        raise ConfigError(f"generation stopped at token {len(seq.tokens)}: {seq.error}")


def generate(
    model: str | LoadedModel,
    prompt: str | Sequence[Mapping[str, Any]],
    config: GenerationConfig | None = None,
    chat: bool | None = None,
    system: str | None = None,
    stream: Callable[[str], None] | None = None,
    draft: str | LoadedModel | Transformer | None = None,
    speculative_layers: int | None = None,
    num_draft_tokens: int = SpeculativeOptions.num_draft_tokens,
    **controls: Any,
) -> str:
    """Generate a continuation of ``prompt`` with ``model`` (a name, path or loaded model).

    Decoding controls come from ``config``, else the model's own defaults (``model_defaults``: its
    generation.yaml / generation_config.json) or greedy decoding when it has none, with ``controls``
    (any ``GenerationConfig`` field, e.g. ``temperature=0.7, top_p=0.9, seed=1``) on top. ``stream``
    receives text deltas as they are decoded (never splitting a UTF-8 character); ``stream_text`` gives
    them as an iterator instead. One text: for ``n`` > 1 choices, logprobs or token counts use
    ``complete``. ``num_beams`` > 1 runs beam search (the best beam's text). Raises ``ConfigError`` for
    controls the model cannot take (e.g. ``logit_bias`` on an id outside its vocabulary) and for a model
    that cannot generate (an encoder: use ``lamina.embed``).

    ``draft`` (a model name, path, ``LoadedModel`` or ``Transformer`` with this model's vocabulary) or
    ``speculative_layers=K`` (this model's own first K layers as the draft) make the engine decode greedy
    requests speculatively (``lamina.generate.speculative``): the draft proposes ``num_draft_tokens``
    tokens a step and the model verifies them in one forward. The text is exactly the greedy text; only
    speed changes. Requests that sample, or ask for logprobs, decode as without a draft.
    """
    lm = _loaded(model)
    cfg = generation_config(lm, config, **controls)
    if cfg.n != 1:
        raise ConfigError(
            f"n={cfg.n}: generate returns one text; lamina.complete(...).choices holds all {cfg.n}"
        )
    return complete(
        lm, prompt, cfg, chat=chat, system=system, stream=stream, draft=draft,
        speculative_layers=speculative_layers, num_draft_tokens=num_draft_tokens,
    ).text  # fmt: skip


# fields whose value changes which token is picked (the logits processors' and the pick's, beam search's):
# a checkpoint that sets any of them has its own decoding defaults; eos ids and budgets say when to stop
_DECODING_FIELDS = (
    {f for p in LOGITS_PROCESSORS for f in p.fields}
    | set(PICK_FIELDS)
    | {"num_beams", "length_penalty", "early_stopping"}
) - {"eos_token_ids", "ignore_eos", "stop_token_ids", "min_new_tokens"}


def model_defaults(lm: LoadedModel) -> GenerationConfig | None:
    """The checkpoint's own decoding controls (``lm.generation``, from its generation.yaml or
    generation_config.json) when it sets any that change which token is picked (temperature, top_p,
    penalties, ...); None when it only names its eos ids and budget, as GGUF files and most HF folders do.

    (A checkpoint whose settings equal ``GenerationConfig``'s defaults, plain sampling at temperature 1,
    cannot be told from one without settings and counts as having none.)
    """
    plain = GenerationConfig()
    if all(getattr(lm.generation, f) == getattr(plain, f) for f in _DECODING_FIELDS):
        return None
    return lm.generation


def generation_config(
    lm: LoadedModel, config: GenerationConfig | None = None, **controls: Any
) -> GenerationConfig:
    """The controls a request runs with: ``config``, else ``model_defaults(lm)``, else greedy (with the
    model's eos ids and max_new_tokens); ``controls`` on top, validated, token ids checked against the
    model's vocabulary. Asking for a sampling control (``top_p``, ``seed``, ...) or for ``n`` > 1
    choices without a ``config`` on greedy defaults asks for sampling (temperature 1; ``num_beams``
    and ``temperature=0`` say otherwise). A control given that the decoding skips (``top_p`` with beam
    search or greedy decoding: ``GenerationConfig.ignored``) is a warning. Raises ``ConfigError`` naming
    the field, and for a model that cannot generate (``require_generative``).
    """
    require_generative(lm.model.config, lm.entry.name)
    base = config or model_defaults(lm) or _greedy(lm)
    asks_to_sample = (
        any(controls.get(k) is not None for k in _SAMPLING_CONTROLS) or (controls.get("n") or 1) > 1
    )
    if config is None and not base.sampling and "temperature" not in controls and asks_to_sample:
        controls["temperature"] = 1.0  # asking for a sampling control (or n > 1 choices) asks for sampling
    given = {k: v for k, v in controls.items() if v is not None}
    cfg = from_dict(GenerationConfig, {**to_dict(base), **given}) if given else base
    cfg.check_token_ids(lm.model.config.vocab_size)
    note = cfg.ignored(given)
    if note is not None:  # a control given that this decoding skips (top_p with beams): one line
        warnings.warn(note, stacklevel=2)
    return cfg


_SAMPLING_CONTROLS = (
    "top_k",
    "top_p",
    "min_p",
    "typical_p",
    "seed",
    "mirostat",
    "top_n_sigma",
    "xtc_probability",
)


def _greedy(lm: LoadedModel) -> GenerationConfig:
    return GenerationConfig(
        temperature=0.0,
        max_new_tokens=lm.generation.max_new_tokens,
        eos_token_ids=lm.generation.eos_token_ids,
    )


def _loaded(model: str | LoadedModel) -> LoadedModel:
    lm = load(model) if isinstance(model, str) else model
    require_generative(lm.model.config, lm.entry.name)
    return lm


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
