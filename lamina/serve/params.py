"""OpenAI request fields -> what the engine takes: prompt token ids and a ``GenerationConfig`` per prompt.

Everything a request asks for is checked here, before any work starts, against the model (vocabulary,
context window, chat template) and the server's limits (``ServeConfig``); each problem is a 400 naming the
request field. OpenAI's names map onto lamina's: ``max_tokens`` / ``max_completion_tokens`` ->
``max_new_tokens``, ``logprobs`` / ``top_logprobs`` -> ``logprobs`` / ``top_logprobs``, ``echo`` with
``logprobs`` -> ``prompt_logprobs``, ``response_format`` -> ``response_format`` (``json_schema``'s
``schema`` -> ``json_schema``), vLLM's ``guided_json`` / ``guided_regex`` / ``guided_choice`` /
``guided_grammar`` -> ``json_schema`` / ``regex`` / ``choices`` / ``grammar``, ``min_tokens`` (vLLM) ->
``min_new_tokens``; temperature defaults to 1 as OpenAI's does (0 is greedy). Beam search: lamina's
``num_beams`` extra field, or vLLM's ``use_beam_search`` with ``best_of`` / ``n`` (``_beams``).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lamina.config import GenerationConfig, from_dict
from lamina.errors import ConfigError, LaminaError
from lamina.generate.text import build_prompt_ids
from lamina.serve.errors import APIError, bad_request, context_length_exceeded
from lamina.serve.registry import ServedModel
from lamina.serve.scheduler import Prompt
from lamina.serve.schemas import ChatCompletionRequest, CompletionRequest, SamplingExtras
from lamina.serve.settings import ServeConfig
from lamina.serve.tools import plan_tools, render_tool_messages
from lamina.tokenizer.chat_template import template_reads

_FIELDS = {f.name for f in dataclasses.fields(GenerationConfig)}
# GenerationConfig fields a request may not set as extra fields: the server owns them, or an OpenAI field
# stands for them (the value says which).
_RESERVED = {
    "eos_token_ids": "the model's eos ids are the server's",
    "max_new_tokens": "use max_tokens",
    "min_new_tokens": "use min_tokens",
    "top_logprobs": "use logprobs (completions) or top_logprobs with logprobs=true (chat)",
    "do_sample": "use temperature (0 = greedy)",
}
_OPENAI_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}
# vLLM's names of the constraint fields
_ALIASES = {
    "guided_choice": "choices",
    "guided_json": "json_schema",
    "guided_regex": "regex",
    "guided_grammar": "grammar",
}
_CONSTRAINTS = ("response_format", "choices", "json_schema", "regex", "grammar")  # GenerationConfig fields
_MIN_TEMPERATURE = 1e-5  # below it sampling is greedy (as vLLM): logits / 1e-300 overflow


@dataclass
class Prepared:
    """A request ready for the scheduler: prompts (ids + config each), their texts for echo, and flags."""

    prompts: list[Prompt]
    prompt_texts: list[str]  # completions: each prompt's text (for echo and text offsets)
    n: int
    zero_tokens: bool  # max_tokens=0: the engine generates one token, the response drops it
    tokens_as_ids: bool = False  # logprobs name tokens "token_id:ID"
    tool_calls: bool = False  # chat: the output may be tool calls (lamina.serve.tools)


def prepare_completion(req: CompletionRequest, served: ServedModel, limits: ServeConfig) -> Prepared:
    """Check a ``/v1/completions`` request and turn it into engine prompts."""
    if req.suffix is not None:
        raise bad_request("suffix is not supported (lamina does not insert text)", param="suffix")
    n = _n(req.n, limits)
    if req.best_of is not None and req.best_of != n and not req.use_beam_search:
        raise bad_request(
            f"best_of={req.best_of} is not supported: only best_of = n ({n}), or beams with use_beam_search",
            param="best_of",
        )
    if req.logprobs is not None and req.logprobs > limits.max_top_logprobs:
        raise bad_request(
            f"logprobs={req.logprobs} is more than the server allows ({limits.max_top_logprobs})",
            param="logprobs",
        )
    ids_list = _completion_prompts(req.prompt, served, limits, req.split_special_tokens)
    if isinstance(req.prompt, str):
        texts = [req.prompt]
    elif isinstance(req.prompt[0], str):
        texts = [str(p) for p in req.prompt]
    else:  # token ids: their text
        tok = served.lm.tokenizer
        texts = [tok.decode(ids) if tok is not None else "" for ids in ids_list]
    controls = _common(req, served, limits)
    controls["logprobs"] = req.logprobs is not None
    controls["top_logprobs"] = req.logprobs or 0
    if req.echo and req.logprobs is not None:
        controls["prompt_logprobs"] = req.logprobs
    _beams(req, controls, n, req.best_of)
    prompts = []
    zero = req.max_tokens == 0
    for i, ids in enumerate(ids_list):
        where = "prompt" if len(ids_list) == 1 else f"prompt[{i}]"
        max_tokens = _max_tokens(req.max_tokens, len(ids), served, limits, n, where)
        cfg = _config({**controls, "max_new_tokens": max(max_tokens, 1)}, served)
        _dry_run(cfg, ids, served)
        prompts.append(Prompt(ids, cfg))
    return Prepared(prompts, texts, n, zero, bool(req.return_tokens_as_token_ids))


def prepare_chat(req: ChatCompletionRequest, served: ServedModel, limits: ServeConfig) -> Prepared:
    """Check a ``/v1/chat/completions`` request and render its messages with the model's chat template."""
    plan = plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls)
    n = _n(req.n, limits)
    if req.top_logprobs is not None:
        if not req.logprobs:
            raise bad_request("top_logprobs needs logprobs=true", param="top_logprobs")
        if req.top_logprobs > limits.max_top_logprobs:
            raise bad_request(
                f"top_logprobs={req.top_logprobs} is more than the server allows ({limits.max_top_logprobs})",
                param="top_logprobs",
            )
    tok = served.lm.tokenizer
    if tok is None or tok.chat_template is None:
        raise bad_request(
            f"The model {served.name!r} has no chat template; use /v1/completions with a prompt",
            param="messages",
        )
    messages = []
    for i, m in enumerate(req.messages):
        content = m.content
        if isinstance(content, list):
            bad = next((p.type for p in content if p.type != "text" or p.text is None), None)
            if bad is not None:
                raise bad_request(
                    f"content parts of type {bad!r} are not supported; only text parts",
                    param=f"messages[{i}].content",
                )
            content = "".join(p.text or "" for p in content)
        _check_unicode(content or "", f"messages[{i}].content")
        message: dict[str, Any] = {
            "role": "system" if m.role == "developer" else m.role,
            "content": content or "",
        }
        if m.tool_calls:
            message["tool_calls"] = m.tool_calls
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        messages.append(message)
    native = template_reads(tok.chat_template or "", "tools")  # the template renders tools itself
    messages, template_tools = render_tool_messages(messages, plan, native)
    try:
        if template_tools:
            ids = tok.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, tools=template_tools
            )
        else:
            ids = build_prompt_ids(served.lm, messages, chat=True)
    except (LaminaError, ValueError, TypeError) as e:
        raise bad_request(
            f"The chat template of {served.name!r} cannot render these messages: {e}", param="messages"
        ) from None
    except Exception as e:  # a template's own raise_exception / jinja errors
        raise bad_request(
            f"The chat template of {served.name!r} cannot render these messages: {e}", param="messages"
        ) from None
    if not ids:
        raise bad_request("the messages render to an empty prompt", param="messages")
    controls = _common(req, served, limits)
    if plan is not None and plan.controls:
        given = [k for k in _CONSTRAINTS if k in controls and k != "response_format"]
        if given or controls.get("response_format", "text") != "text":
            raise bad_request("tools cannot be combined with another output constraint", param="tool_choice")
        controls.update(plan.controls)
        controls["_origins"] = {**controls.get("_origins", {}), **dict.fromkeys(plan.controls, "tools")}
    controls["logprobs"] = bool(req.logprobs)
    controls["top_logprobs"] = req.top_logprobs or 0
    _beams(req, controls, n, None)
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = _max_tokens(asked, len(ids), served, limits, n, "messages", param=param)
    cfg = _config({**controls, "max_new_tokens": max(max_tokens, 1)}, served)
    _dry_run(cfg, ids, served)
    calls = plan is not None and plan.calls
    return Prepared([Prompt(ids, cfg)], [], n, asked == 0, bool(req.return_tokens_as_token_ids), calls)


def _beams(req: SamplingExtras, controls: dict[str, Any], n: int, best_of: int | None) -> None:
    """Beam search: lamina's ``num_beams`` extra field, or vLLM's ``use_beam_search`` (``num_beams`` =
    max(best_of or n, 2)). A beam request runs in the engine's batch as a beam group of num_beams rows;
    what beam search cannot give (a stream, logprobs, stop strings, structured output, n > num_beams) is
    a 400."""
    if req.use_beam_search:
        controls["num_beams"] = max(controls.get("num_beams") or 1, best_of or n, 2)
    beams = controls.get("num_beams") or 1
    if beams <= 1:
        return
    controls["temperature"] = 0.0  # beam search picks by score; OpenAI's default temperature 1 does not apply
    param = "use_beam_search" if req.use_beam_search else "num_beams"
    for name, asked in (
        ("stream", bool(getattr(req, "stream", False))),
        ("logprobs", bool(controls.get("logprobs"))),
        ("prompt_logprobs", controls.get("prompt_logprobs") is not None),
        ("stop", bool(controls.get("stop"))),
        (
            "response_format",
            controls.get("response_format", "text") != "text"
            or any(controls.get(f) for f in ("choices", "json_schema", "regex", "grammar")),
        ),
    ):
        if asked:
            raise bad_request(
                f"{name} is not supported with beam search (num_beams={beams}): beam search knows its "
                f"beams only at the end; drop {name} or {param}",
                param=name,
            )
    if n > beams:
        raise bad_request(
            f"n={n} is more than num_beams={beams}: beam search returns its n best beams", param="n"
        )


def _n(n: int | None, limits: ServeConfig) -> int:
    n = 1 if n is None else n
    if n > limits.max_n:
        raise bad_request(f"n={n} is more than the server allows ({limits.max_n}, --max-n)", param="n")
    return n


def _completion_prompts(
    prompt: Any, served: ServedModel, limits: ServeConfig, split_special_tokens: bool = False
) -> list[list[int]]:
    """Token ids of each prompt of a completions request (strings are encoded, id lists checked)."""
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise bad_request("prompt must not be an empty list", param="prompt")
    if len(prompts) > limits.max_prompts:
        raise bad_request(
            f"{len(prompts)} prompts in one request; the server allows at most {limits.max_prompts}",
            param="prompt",
        )
    out = []
    for i, p in enumerate(prompts):
        where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        if isinstance(p, str):
            _check_unicode(p, where)
            if served.lm.tokenizer is None:
                raise bad_request(f"The model {served.name!r} has no tokenizer: send token ids", param=where)
            ids = build_prompt_ids(served.lm, p, chat=False, split_special_tokens=split_special_tokens)
        else:
            ids = list(p)
            bad = next((t for t in ids if not 0 <= t < served.vocab_size), None)
            if bad is not None:
                raise bad_request(
                    f"token id {bad} is outside the vocabulary [0, {served.vocab_size})", param=where
                )
        if not ids:
            raise bad_request("the prompt is empty (it has no tokens)", param=where)
        out.append(ids)
    return out


def _check_unicode(text: str, param: str) -> None:
    """Refuse text that is not valid Unicode (JSON can carry lone surrogates such as "\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise bad_request(
            f"{param} is not valid Unicode text ({e.reason} at {e.start})", param=param
        ) from None


def _max_tokens(
    asked: int | None,
    prompt_len: int,
    served: ServedModel,
    limits: ServeConfig,
    n: int,
    prompt_param: str,
    param: str = "max_tokens",
) -> int:
    """The completion budget: ``asked`` (checked against the context window) or the rest of the context.
    An encoder-decoder's prompt is its source, checked against the encoder's window, and ``asked``
    against the decoder's (``_seq2seq_max_tokens``)."""
    if served.lm.model.config.arch == "encoder-decoder":
        return _seq2seq_max_tokens(asked, prompt_len, served, limits, n, prompt_param, param)
    ctx = served.context_length
    if prompt_len >= ctx:
        raise context_length_exceeded(
            f"This model's maximum context length is {ctx} tokens. However, your {prompt_param} has "
            f"{prompt_len} tokens, which leaves no room for the completion. Please shorten the "
            f"{prompt_param}.",
            param=prompt_param,
        )
    if asked is None:  # the rest of the context window, within the tokens-in-flight limit
        budget = ctx - prompt_len
        if limits.max_tokens_in_flight is not None:
            budget = min(budget, limits.max_tokens_in_flight // n - prompt_len)
        return max(budget, 1)
    if asked > ctx:
        raise bad_request(
            f"{param}={asked} is more than the model's context window ({ctx} tokens)", param=param
        )
    if prompt_len + asked > ctx:
        raise context_length_exceeded(
            f"This model's maximum context length is {ctx} tokens. However, you requested "
            f"{prompt_len + asked} tokens ({prompt_len} in the {prompt_param}, {asked} in the completion). "
            f"Please reduce the length of the {prompt_param} or completion.",
            param=param,
        )
    return asked


def _seq2seq_max_tokens(
    asked: int | None,
    source_len: int,
    served: ServedModel,
    limits: ServeConfig,
    n: int,
    prompt_param: str,
    param: str,
) -> int:
    """The completion budget of an encoder-decoder: the source (the prompt) and the output live in two
    windows. The encoder reads at most ``max_seq_len`` source tokens with learned or sinusoidal positions
    (a position table's size); with T5's relative position bias the model takes any number (as
    transformers' T5 and the library engine do, ``lamina.generate.engine.max_source_tokens``), but the
    server reads at most ``limits.max_source_tokens`` (default ``max_seq_len``): a source is encoded in
    one go and attention's memory grows with the square of its length. The decoder holds its start token
    and at most ``max_seq_len - 1`` new tokens, whatever the source's length. Raises 400
    ``context_length_exceeded`` for a longer source, or one that leaves no room for one new token per
    sequence within ``max_tokens_in_flight``."""
    from lamina.generate.engine import max_source_tokens

    ctx = served.context_length
    limit = limits.max_source_tokens if limits.max_source_tokens is not None else ctx
    if (positions := max_source_tokens(served.lm.model.config)) is not None:
        limit = min(limit, positions)  # learned / sinusoidal positions end there whatever the server allows
    if source_len > limit:
        hint = " (lamina serve --max-source-tokens)" if positions is None or limit < positions else ""
        raise context_length_exceeded(
            f"This model's encoder reads at most {limit} tokens{hint}. However, your {prompt_param} has "
            f"{source_len} tokens. Please shorten the {prompt_param}.",
            param=prompt_param,
        )
    room = ctx - 1  # decoder positions after decoder_start_token_id
    if asked is None:  # the decoder's whole window, within the tokens-in-flight limit
        budget = room
        if limits.max_tokens_in_flight is not None:
            budget = min(budget, limits.max_tokens_in_flight // n - source_len - 1)
            if budget < 1:  # the source + start token + one new token do not fit each sequence's share
                raise context_length_exceeded(
                    f"This server holds at most {limits.max_tokens_in_flight} tokens in flight "
                    f"(lamina serve --max-tokens-in-flight): {limits.max_tokens_in_flight // n} for each of "
                    f"{n} sequences. However, your {prompt_param} has {source_len} tokens, and each "
                    f"sequence needs them, its start token and one new token. Please shorten the "
                    f"{prompt_param} or ask for fewer sequences.",
                    param=prompt_param,
                )
        return budget
    if asked > room:
        raise context_length_exceeded(
            f"This model's decoder holds at most {ctx} tokens: its start token and {room} new tokens. "
            f"However, you requested {asked} tokens in the completion. Please reduce {param}.",
            param=param,
        )
    return asked


def _common(req: SamplingExtras, served: ServedModel, limits: ServeConfig) -> dict[str, Any]:
    """The decoding controls both routes share, as GenerationConfig fields."""
    get = req.__dict__.get
    asked = get("temperature")
    temperature = 1.0 if asked is None else float(asked)  # OpenAI's default: 1
    controls: dict[str, Any] = {
        "n": _n(get("n"), limits),
        "temperature": 0.0 if temperature < _MIN_TEMPERATURE else temperature,
    }
    for name in ("top_p", "presence_penalty", "frequency_penalty"):
        if get(name) is not None:
            controls[name] = get(name)
    seed = get("seed")
    if seed is not None:
        controls["seed"] = seed % 2**64  # OpenAI's seeds are signed 64-bit integers
    stop = get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else list(stop)
        if len(stops) > limits.max_stop:
            raise bad_request(
                f"{len(stops)} stop sequences; the server allows at most {limits.max_stop}", param="stop"
            )
        if any(not s for s in stops):
            raise bad_request("stop sequences must not be empty strings", param="stop")
        controls["stop"] = stops
    bias = get("logit_bias")
    if bias:
        controls["logit_bias"] = _logit_bias(bias, served, limits)
    fmt = get("response_format")
    if fmt is not None:
        if fmt.type == "json_schema":
            spec = fmt.json_schema
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise bad_request(
                    'response_format {"type": "json_schema"} needs "json_schema": {"name": ..., "schema": '
                    '{...}, "strict": true}',
                    param="response_format",
                )
            # OpenAI: a missing schema allows any JSON; "strict" false is constrained all the same
            controls["json_schema"] = spec.get("schema", {})
            controls["_origins"] = {"json_schema": "response_format"}
        elif fmt.type != "text":
            controls["response_format"] = fmt.type
    for name, field in (
        ("top_k", "top_k"),
        ("min_p", "min_p"),
        ("typical_p", "typical_p"),
        ("repetition_penalty", "repetition_penalty"),
        ("stop_token_ids", "stop_token_ids"),
        ("min_tokens", "min_new_tokens"),
        ("ignore_eos", "ignore_eos"),
        ("include_stop_str_in_output", "include_stop_str_in_output"),
        ("prompt_logprobs", "prompt_logprobs"),
    ):
        if get(name) is not None:
            controls[field] = get(name)
    if (controls.get("prompt_logprobs") or 0) > limits.max_top_logprobs:
        raise bad_request(
            f"prompt_logprobs is more than the server allows ({limits.max_top_logprobs})",
            param="prompt_logprobs",
        )
    for key, value in (req.model_extra or {}).items():
        name = _ALIASES.get(key, key)
        if name in _RESERVED:
            raise bad_request(f"{key} cannot be set in a request: {_RESERVED[name]}", param=key)
        if name not in _FIELDS:
            raise bad_request(f"Unrecognized request argument supplied: {key}", param=key)
        if name == "json_schema" and isinstance(value, str):  # vLLM takes guided_json as JSON text too
            try:
                value = json.loads(value)
            except ValueError as e:
                raise bad_request(f"{key} is not valid JSON: {e}", param=key) from None
        if name in ("json_schema", "grammar") and not isinstance(value, dict | str):
            raise bad_request(f"{key} must be a JSON object (json_schema) or a string (grammar)", param=key)
        if name != key:
            controls["_origins"] = {**controls.get("_origins", {}), name: key}
        controls[name] = value
    return controls


def _logit_bias(bias: Mapping[str, float], served: ServedModel, limits: ServeConfig) -> dict[int, float]:
    if len(bias) > limits.max_logit_bias:
        raise bad_request(
            f"logit_bias has {len(bias)} entries; the server allows at most {limits.max_logit_bias}",
            param="logit_bias",
        )
    out = {}
    for key, value in bias.items():
        if not re.fullmatch(r"\d{1,9}", key):  # the vocabulary: GenerationConfig.check_token_ids
            raise bad_request(
                f"logit_bias key {key[:40]!r} is not a token id in [0, {served.vocab_size})",
                param="logit_bias",
            )
        if not -100 <= value <= 100:
            raise bad_request(
                f"logit_bias value {value} for token {key} is outside [-100, 100]", param="logit_bias"
            )
        out[int(key)] = float(value)
    return out


def _config(controls: dict[str, Any], served: ServedModel) -> GenerationConfig:
    """``GenerationConfig`` from ``controls``; its validation errors become 400s naming the field."""
    controls = dict(controls)
    origins: dict[str, str] = controls.pop("_origins", {})  # field -> the request key that set it
    grammar = controls.pop("grammar", "")  # set after parsing: a request's text is never read as a file name
    try:
        cfg = from_dict(GenerationConfig, controls)
        if grammar:
            cfg = dataclasses.replace(cfg, grammar=grammar)
        cfg.check_token_ids(served.vocab_size)  # the library's one check of token-id fields
    except ConfigError as e:
        m = re.match(r"(?:unknown GenerationConfig field '|)(\w+)", str(e))
        name = m.group(1) if m and m.group(1) in _FIELDS else None
        msg = str(e)
        key = origins.get(name or "") or _OPENAI_NAMES.get(name or "")
        if key:
            msg = msg.replace(name or "", key, 1)
        raise bad_request(msg, param=key or name) from None
    if cfg.constrained:
        _check_constraint(cfg, served, origins)
    return cfg


def _dry_run(cfg: GenerationConfig, ids: list[int], served: ServedModel) -> None:
    """Sample once from flat logits with a throwaway sampler, so that settings that fail at the first step
    (every token banned, a sampler that cannot be built) are a 400 here, not an error inside the batch."""
    from lamina.generate.sampling import Sampler

    try:
        sampler = Sampler(cfg, ids, tokenizer=served.lm.tokenizer)
        sampler.sample(torch.zeros(served.vocab_size), accept=False)
    except LaminaError as e:
        raise bad_request(str(e)) from None


def _check_constraint(cfg: GenerationConfig, served: ServedModel, origins: Mapping[str, str] = {}) -> None:
    """Refuse, before work starts, a constrained output the model cannot produce (too few tokens, a schema
    keyword that is not supported, a broken regex or grammar); ``origins``: field -> the request key that
    set it (``guided_json``, ``response_format``) where not the field's own name."""
    field = next(name for name, on in cfg.constraint_fields().items() if on)
    param = origins.get(field, field)
    if served.lm.tokenizer is None:
        raise bad_request("constrained output needs the model's tokenizer", param=param)
    try:
        from lamina.generate.constrain import make_constraint

        make_constraint(cfg, served.lm.tokenizer, served.vocab_size, served.lm.generation.eos_token_ids)
    except LaminaError as e:
        raise bad_request(f"{param}: {e}" if param != field else str(e), param=param) from None
    except ImportError as e:  # pragma: no cover - constrain.py is part of lamina
        raise APIError(500, f"constrained output is unavailable: {e}") from None
