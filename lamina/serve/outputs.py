"""Engine results -> OpenAI response objects: completions and chat completions, whole or as SSE chunks.

Choice ``index`` is ``prompt index * n + sequence index`` (OpenAI's order for several prompts). Legacy
completions ``logprobs`` hold, per token: its text (``tokens``), its logprob (``token_logprobs``; None for
an echoed prompt's first token, which has no context), a dict of the most likely alternatives with the
token itself (``top_logprobs``), and its character offset in prompt + completion (``text_offset``): the
shape lm-evaluation-harness reads. Chat ``logprobs.content`` lists ``{token, logprob, bytes,
top_logprobs}``.

Every generated token has its entry, the eos or stop token that ended the sequence included (named by its
own text, e.g. ``<|im_end|>``, although the completion's text leaves it out), as OpenAI's legacy
completions do: a client that drops the last entry (lm-evaluation-harness with ``max_tokens=1``) then
drops the generated token, never part of the prompt. ``usage.completion_tokens`` counts that token too.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from lamina.generate.engine import Delta, Sequence_, TokenLogprob
from lamina.serve.errors import APIError
from lamina.serve.params import Prepared
from lamina.serve.registry import ServedModel
from lamina.serve.scheduler import Job
from lamina.serve.schemas import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessageOut,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    TopLogprob,
    Usage,
)
from lamina.serve.tools import parse_tool_calls

DONE = "data: [DONE]\n\n"


def new_id(prefix: str) -> str:
    """A response id such as ``cmpl-3f1c...``."""
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prepared: Prepared, job: Job | None = None, completion_tokens: int | None = None) -> Usage:
    """Token counts: every prompt once, every choice's generated tokens."""
    prompt = sum(len(p.ids) for p in prepared.prompts)
    if completion_tokens is None:
        completion_tokens = (
            0 if job is None or prepared.zero_tokens else sum(len(_generated(s)[0]) for s in job.all_seqs)
        )
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion_tokens, total_tokens=prompt + completion_tokens
    )


def _token_str(served: ServedModel, as_ids: bool) -> Callable[[int], str]:
    """How logprobs name a token: its text, or ``token_id:ID`` (vLLM's ``return_tokens_as_token_ids``)."""
    return (lambda t: f"token_id:{t}") if as_ids else served.token_str


def _finish(seq: Sequence_, prepared: Prepared) -> Any:
    return "length" if prepared.zero_tokens else seq.finish_reason


def _generated(seq: Sequence_) -> tuple[list[int], list[TokenLogprob | None]]:
    """The sequence's generated tokens and their logprobs (None where not asked for), ending with the eos
    or stop token that ended it when one did."""
    tokens = list(seq.tokens)
    lps: list[TokenLogprob | None] = list(seq.logprobs or [])
    lps += [None] * (len(tokens) - len(lps))
    if seq.stop_token is not None:
        tokens.append(seq.stop_token)
        lps.append(seq.stop_logprob)
    return tokens, lps


def _stop_reason(seq: Sequence_, served: ServedModel) -> str | int | None:
    """vLLM's ``stop_reason``: the stop string or stop token id that ended the sequence (None for eos)."""
    if seq.stop_str is not None:
        return seq.stop_str
    eos = served.lm.generation.eos_token_ids
    return seq.stop_token if seq.stop_token is not None and seq.stop_token not in eos else None


def _delta_token(d: Delta) -> int | None:
    """The token a delta brings: its generated token, or the eos / stop token that ended the sequence."""
    if d.token is not None:
        return d.token
    return d.seq.stop_token if d.finished else None


# -- completions -----------------------------------------------------------------------------------------------


class _Offsets:
    """Legacy logprobs for a run of tokens, with text offsets continuing where the last run ended."""

    def __init__(self, served: ServedModel, k: int | None, start: int = 0, as_ids: bool = False) -> None:
        self.k, self.pos = k, start
        self.token_str = _token_str(served, as_ids)

    def logprobs(self, tokens: Sequence[int], lps: Sequence[TokenLogprob | None]) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for token, lp in zip(tokens, lps, strict=True):
            s = self.token_str(token)
            out.tokens.append(s)
            out.text_offset.append(self.pos)
            self.pos += len(s)
            if lp is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            out.token_logprobs.append(lp.logprob)
            top: dict[str, float] = {}
            for t, v in lp.top[: self.k or 0]:
                top.setdefault(self.token_str(t), v)
            top.setdefault(s, lp.logprob)
            out.top_logprobs.append(top)
        return out


def _extend(a: CompletionLogprobs, b: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(
        tokens=a.tokens + b.tokens,
        token_logprobs=a.token_logprobs + b.token_logprobs,
        top_logprobs=a.top_logprobs + b.top_logprobs,
        text_offset=a.text_offset + b.text_offset,
    )


def completion_response(
    job: Job, prepared: Prepared, served: ServedModel, echo: bool, logprobs: int | None
) -> CompletionResponse:
    """The whole ``text_completion`` of a finished job."""
    choices = []
    for pi, group in enumerate(job.seqs):
        prompt = prepared.prompts[pi].ids
        prefix = prepared.prompt_texts[pi] if echo else ""
        for seq in group:
            tokens, lps = ([], []) if prepared.zero_tokens else _generated(seq)
            text = prefix + ("" if prepared.zero_tokens else seq.text or "")
            lp = None
            if logprobs is not None:
                offsets = _Offsets(
                    served, logprobs, 0 if echo else len(prepared.prompt_texts[pi]), prepared.tokens_as_ids
                )
                lp = CompletionLogprobs()
                if echo:
                    lp = offsets.logprobs(prompt, seq.prompt_logprobs or [None] * len(prompt))
                lp = _extend(lp, offsets.logprobs(tokens, lps))
            choices.append(
                CompletionChoice(
                    index=pi * prepared.n + seq.index,
                    text=text,
                    logprobs=lp,
                    finish_reason=_finish(seq, prepared),
                    stop_reason=_stop_reason(seq, served),
                )
            )
    return CompletionResponse(
        id=new_id("cmpl"),
        created=int(time.time()),
        model=served.name,
        choices=choices,
        usage=usage(prepared, job),
    )


async def _sse(
    job: Job, chunks: AsyncIterator[str], usage_chunk: Callable[[], str] | None
) -> AsyncIterator[str]:
    """Frame a stream of ``data:`` chunks: then the usage chunk (with ``include_usage``) and ``[DONE]``;
    an error event and ``[DONE]`` if the job fails; the job cancelled if the stream stops early (the
    client went away)."""
    finished = False
    try:
        async for c in chunks:
            yield c
        finished = True
        if usage_chunk is not None:
            yield usage_chunk()
        yield DONE
    except APIError as e:
        finished = True
        yield e.sse()
        yield DONE
    finally:
        if not finished:
            job.cancel()


def completion_stream(
    job: Job,
    prepared: Prepared,
    served: ServedModel,
    echo: bool,
    logprobs: int | None,
    include_usage: bool,
) -> AsyncIterator[str]:
    """``text_completion`` chunks as server-sent events, ending with ``data: [DONE]``.

    The job is cancelled if the stream stops early (the client went away).
    """
    rid, created, n = new_id("cmpl"), int(time.time()), prepared.n
    offsets: dict[int, _Offsets] = {}
    counted = [0]  # completion tokens so far

    def chunk(index: int, text: str, lp: CompletionLogprobs | None, finish: Any = None) -> str:
        c = CompletionChoice(index=index, text=text, logprobs=lp, finish_reason=finish)
        body = CompletionResponse(id=rid, created=created, model=served.name, choices=[c])
        return f"data: {body.model_dump_json(exclude={'usage'})}\n\n"

    async def chunks() -> AsyncIterator[str]:
        async for pi, d in job.events():
            idx = pi * n + d.seq.index
            if idx not in offsets:  # the choice's first delta: the prefill is done
                start = 0 if echo else len(prepared.prompt_texts[pi])
                offsets[idx] = _Offsets(served, logprobs, start, prepared.tokens_as_ids)
                if echo:
                    ids = prepared.prompts[pi].ids
                    plp = None
                    if logprobs is not None:
                        plp = offsets[idx].logprobs(ids, d.seq.prompt_logprobs or [None] * len(ids))
                    yield chunk(idx, prepared.prompt_texts[pi], plp)
            lp = None
            token = _delta_token(d)
            if (
                logprobs is not None
                and token is not None
                and d.logprob is not None
                and not prepared.zero_tokens
            ):
                lp = offsets[idx].logprobs([token], [d.logprob])
            text = "" if prepared.zero_tokens else d.text
            if token is not None and not prepared.zero_tokens:
                counted[0] += 1
            finish = _finish(d.seq, prepared) if d.finished else None
            if text or lp is not None or finish is not None:
                yield chunk(idx, text, lp, finish)

    def usage_chunk() -> str:
        body = CompletionResponse(
            id=rid, created=created, model=served.name, choices=[], usage=usage(prepared, None, counted[0])
        )
        return f"data: {body.model_dump_json()}\n\n"

    return _sse(job, chunks(), usage_chunk if include_usage else None)


def _chat_logprobs(
    token_str: Callable[[int], str], tokens: Sequence[int], lps: Sequence[TokenLogprob | None], k: int
) -> ChatLogprobs:
    content = []
    for token, lp in zip(tokens, lps, strict=True):
        if lp is None:
            continue
        s = token_str(token)
        top = [
            TopLogprob(token=(t_s := token_str(t)), logprob=v, bytes=list(t_s.encode("utf-8")))
            for t, v in lp.top[:k]
        ]
        content.append(
            ChatTokenLogprob(token=s, logprob=lp.logprob, bytes=list(s.encode("utf-8")), top_logprobs=top)
        )
    return ChatLogprobs(content=content)


def chat_response(
    job: Job, prepared: Prepared, served: ServedModel, logprobs: bool, top_logprobs: int
) -> ChatCompletionResponse:
    """The whole ``chat.completion`` of a finished job."""
    choices = []
    for seq in job.seqs[0]:
        tokens, lps = ([], []) if prepared.zero_tokens else _generated(seq)
        token_str = _token_str(served, prepared.tokens_as_ids)
        lp = _chat_logprobs(token_str, tokens, lps, top_logprobs) if logprobs else None
        text = "" if prepared.zero_tokens else seq.text or ""
        calls = parse_tool_calls(text) if prepared.tool_calls else None
        choices.append(
            ChatChoice(
                index=seq.index,
                message=ChatMessageOut(content=None, tool_calls=calls)
                if calls
                else ChatMessageOut(content=text),
                logprobs=lp,
                finish_reason="tool_calls" if calls else _finish(seq, prepared),
            )
        )
    return ChatCompletionResponse(
        id=new_id("chatcmpl"),
        created=int(time.time()),
        model=served.name,
        choices=choices,
        usage=usage(prepared, job),
    )


def chat_stream(
    job: Job,
    prepared: Prepared,
    served: ServedModel,
    logprobs: bool,
    top_logprobs: int,
    include_usage: bool,
    sources: list[dict[str, Any]] | None = None,
    cite: Callable[[str], dict[str, Any]] | None = None,
) -> AsyncIterator[str]:
    """``chat.completion.chunk`` events: the role first, then content deltas, then each finish_reason.

    Grounded requests (``lamina.serve.grounding``): ``sources`` goes on the first chunk, and each choice's
    finishing chunk carries what ``cite`` reads from its whole text (``citations``, ``dropped_citations``)."""
    rid, created, n = new_id("chatcmpl"), int(time.time()), prepared.n
    counted = [0]  # completion tokens so far
    usage_field: dict[str, Any] = {"usage": None} if include_usage else {}
    texts: dict[int, str] = {}  # grounded: each choice's text so far

    def chunk(choice: ChatChunkChoice, **more: Any) -> str:
        body = ChatCompletionChunk(id=rid, created=created, model=served.name, choices=[choice])
        data = body.model_dump(exclude={"usage"})
        if cite is not None and choice.finish_reason is not None:
            data["choices"][0].update(cite(texts.get(choice.index, "")))
        return f"data: {json.dumps({**data, **more, **usage_field}, ensure_ascii=False)}\n\n"

    held: dict[int, str] = {}  # tool mode: each choice's text, held until it is known to be calls or text

    def finish(k: int, d: Delta) -> Iterator[str]:
        if not prepared.tool_calls:
            yield chunk(ChatChunkChoice(index=k, delta=ChatDelta(), finish_reason=_finish(d.seq, prepared)))
            return
        text = held.pop(k, "")
        calls = parse_tool_calls(text)
        if not calls:
            if text:
                yield chunk(ChatChunkChoice(index=k, delta=ChatDelta(content=text)))
            yield chunk(ChatChunkChoice(index=k, delta=ChatDelta(), finish_reason=_finish(d.seq, prepared)))
            return
        for j, c in enumerate(calls):  # OpenAI's deltas: id and name first, then the arguments
            head = {
                "index": j,
                "id": c["id"],
                "type": "function",
                "function": {"name": c["function"]["name"], "arguments": ""},
            }
            yield chunk(ChatChunkChoice(index=k, delta=ChatDelta(tool_calls=[head])))
            args = {"index": j, "function": {"arguments": c["function"]["arguments"]}}
            yield chunk(ChatChunkChoice(index=k, delta=ChatDelta(tool_calls=[args])))
        yield chunk(ChatChunkChoice(index=k, delta=ChatDelta(), finish_reason="tool_calls"))

    async def chunks() -> AsyncIterator[str]:
        for k in range(n):
            first = {"sources": sources} if sources is not None and k == 0 else {}
            yield chunk(ChatChunkChoice(index=k, delta=ChatDelta(role="assistant", content="")), **first)
        async for _, d in job.events():
            k = d.seq.index
            text = "" if prepared.zero_tokens else d.text
            if cite is not None:
                texts[k] = texts.get(k, "") + text
            if prepared.tool_calls:
                held[k] = held.get(k, "") + text
                text = ""
            lp = None
            token = _delta_token(d)
            if token is not None and not prepared.zero_tokens:
                counted[0] += 1
                if logprobs and d.logprob is not None:
                    lp = _chat_logprobs(
                        _token_str(served, prepared.tokens_as_ids), [token], [d.logprob], top_logprobs
                    )
            if text or lp is not None:
                yield chunk(ChatChunkChoice(index=k, delta=ChatDelta(content=text), logprobs=lp))
            if d.finished:
                for line in finish(k, d):
                    yield line

    def usage_chunk() -> str:
        body = ChatCompletionChunk(
            id=rid, created=created, model=served.name, choices=[], usage=usage(prepared, None, counted[0])
        )
        return f"data: {body.model_dump_json()}\n\n"

    return _sse(job, chunks(), usage_chunk if include_usage else None)
