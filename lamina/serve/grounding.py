"""Retrieval in the server: ``lamina serve MODEL --index PATH`` answers from an index of ``lamina index``.

    POST /v1/retrieve           {"query": ..., "top_k": 5, "mode": "dense", "filters": {...},
                                 "score_threshold": ...} -> the passages, best first (``Passage``:
                                 number, document, chunk_id, title, text, span, page, score)
    POST /v1/chat/completions   with the extra field ``"rag": true`` (or the same options as an object):
                                 the last message, the user's question, is answered from the passages
                                 retrieved for it, numbered [1], [2] ...; the response's ``sources`` list
                                 the passages the prompt showed, each choice's ``citations`` the numbers
                                 its text cites (streamed: ``sources`` on the first chunk, ``citations``
                                 on each choice's finishing chunk)

Everything is :mod:`lamina.rag`'s: retrieval is ``lamina.rag.retrieve.retrieve`` (the store's own embedding
model embeds the query: a served embedding model when it is that model, else loaded once), the prompt is
``compact`` synthesis' (``lamina.rag.synthesize.compact_prompt``: instructions, the passages that fit the
context window, the question), and the answer's markers are read by ``lamina.rag.synthesize.cite`` (a
number no prompt showed is removed and counted). The generation itself runs on the model's engine like
any chat request (batched, streamed, cancellable). When retrieval finds nothing (or nothing reaches
``score_threshold``) the answer is "Not found in the sources." and the model is not called (the request
is still checked as a model call would be: a bad one is a 400 either way).

``rag`` is refused (400) with tools and with an output constraint (``response_format`` json_object /
json_schema, ``choices``, ``json_schema``, ``regex``, ``grammar`` and vLLM's ``guided_*``): the answer cites
as ``[n]`` in free text, which a constrained output would not allow (and reading its markers would rewrite
e.g. JSON's ``[7]``). ``[n]`` after an identifier character, ``]`` or ``)`` (``sys.argv[0]``) or inside code
is not a citation (``cite``). A query (or grounded question) has at most ``MAX_QUERY_CHARS`` characters,
filters at most ``MAX_FILTER_KEYS`` keys of ``MAX_FILTER_VALUES`` values (``schemas.RagOptions``); a store
error the request caused (SQLite's "too many SQL variables", an integer it cannot bind) is a 400.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from lamina.errors import ConfigError
from lamina.rag.retrieve import RetrieveConfig, retrieve, same_model
from lamina.rag.synthesize import NOT_FOUND, Citation, SynthesizeConfig, cite, compact_prompt
from lamina.rag.types import Hit, Store
from lamina.serve.errors import APIError, bad_request, context_length_exceeded
from lamina.serve.outputs import DONE, new_id
from lamina.serve.params import _ALIASES, _CONSTRAINTS
from lamina.serve.registry import Registry, ServedModel
from lamina.serve.schemas import (
    MAX_QUERY_CHARS,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    GroundedChatChoice,
    GroundedChatCompletionResponse,
    Passage,
    RagOptions,
    Usage,
)
from lamina.serve.settings import ServeConfig

if TYPE_CHECKING:
    from lamina.checkpoint.load import LoadedModel


class ServedIndex:
    """The server's index: its store, the embedding model that queries it, and a lock (one query at a
    time on the store's connection and the embedder)."""

    def __init__(self, store: Store, embedder: LoadedModel, lock: threading.Lock | None = None) -> None:
        self.store, self.embedder = store, embedder
        self.lock = lock or threading.Lock()

    @classmethod
    def open(cls, location: str, registry: Registry) -> ServedIndex:
        """Open the index at ``location`` (SQLite file or ``postgresql://`` URL). Its embedding model is a
        served embedding model when one is that model (sharing its lock), else loaded by the name the index
        stores. Raises ``ConfigError`` for a missing file (naming how to build one)."""
        from lamina.checkpoint.load import load
        from lamina.rag.store import is_postgres, open_store

        if not is_postgres(location) and not Path(location).is_file():
            raise ConfigError(
                f"no index at {location}: build one with `lamina index PATH --store {location}` (or "
                "`lamina index --builtin stdlib-docs`), or give --index an existing index"
            )
        store = open_store(location)
        try:
            for m in registry.models():
                if m.kind == "embedding" and same_model(m.lm, store.embedding_model):
                    return cls(store, m.lm, m._embed_lock)
            return cls(store, load(store.embedding_model))
        except BaseException:
            store.close()
            raise

    def search(self, query: str, options: RagOptions, limits: ServeConfig) -> list[Hit]:
        """The passages for ``query`` as ``options`` ask (400 for a ``top_k`` over the server's limit or
        options ``RetrieveConfig`` refuses)."""
        cfg = retrieve_config(options, limits)
        with self.lock:
            try:
                return retrieve(self.store, query, cfg, self.embedder)
            except ConfigError as e:
                raise bad_request(str(e), param="query") from None
            except (OverflowError, sqlite3.OperationalError) as e:  # the request's size, not the server
                if isinstance(e, sqlite3.OperationalError) and not any(w in str(e) for w in _TOO_BIG):
                    raise
                raise bad_request(
                    f"the index cannot run this query ({e}): use fewer or smaller filter values, or a "
                    "shorter query",
                    param="filters" if options.filters else "query",
                ) from None

    def describe(self) -> dict[str, Any]:
        """What the page shows: the embedding model and the number of chunks (no path: /lamina/config is
        open)."""
        with self.lock:
            return {"embedding_model": self.store.embedding_model, "chunks": self.store.count()}

    def close(self) -> None:
        with self.lock:
            self.store.close()


_TOO_BIG = ("too many", "too big", "too complex", "too large")  # SQLite's limits, reached by a request


def retrieve_config(options: RagOptions, limits: ServeConfig) -> RetrieveConfig:
    """``options`` over ``RetrieveConfig``'s defaults; 400 naming the field for a value it refuses."""
    given = options.model_dump(include=set(RagOptions.model_fields), exclude_none=True)
    if "top_k" in given:
        if given["top_k"] > limits.max_retrieve_top_k:
            raise bad_request(
                f"top_k={given['top_k']} is more than the server allows ({limits.max_retrieve_top_k})",
                param="top_k",
            )
        given["k"] = given.pop("top_k")
        given["candidates"] = max(RetrieveConfig.candidates, given["k"])
    try:
        return RetrieveConfig(**given)
    except ConfigError as e:
        raise bad_request(str(e), param="rag") from None


def passages(hits: list[Hit]) -> list[Passage]:
    """Retrieved hits as response passages (``number`` = rank)."""
    return [
        Passage(
            number=h.rank, document=h.chunk.doc_id, chunk_id=h.chunk.chunk_id,
            title=str(h.chunk.metadata.get("title") or h.chunk.doc_id), text=h.chunk.text,
            span=(h.chunk.start, h.chunk.end), page=h.chunk.metadata.get("page"), score=h.score,
        )
        for h in hits
    ]  # fmt: skip


def sources(shown: list[Citation], hits: list[Hit]) -> list[Passage]:
    """The passages a prompt showed (their text and span as shown: a first passage may have been cut)."""
    score = {h.chunk.chunk_id: h.score for h in hits}
    return [
        Passage(number=s.number, document=s.doc_id, chunk_id=s.chunk_id, title=s.title, text=s.text,
                span=(s.start, s.end), page=s.page, score=score.get(s.chunk_id, 0.0))
        for s in shown
    ]  # fmt: skip


@dataclass
class Grounding:
    """A chat request grounded on the index: the request with its question replaced by the compact prompt,
    the passages that prompt shows (numbered as the answer cites them) and every hit."""

    request: ChatCompletionRequest
    shown: list[Citation] = field(default_factory=list)
    hits: list[Hit] = field(default_factory=list)

    @property
    def sources(self) -> list[Passage]:
        return sources(self.shown, self.hits)


def ground(
    req: ChatCompletionRequest, served: ServedModel, index: ServedIndex | None, limits: ServeConfig
) -> Grounding:
    """Retrieve for ``req``'s last message and put the passages into it (``compact`` synthesis' prompt).

    The prompt's passages fill what the model's context leaves after the earlier messages and the answer
    (``max_tokens``, else ``SynthesizeConfig.max_new_tokens``). No hit: ``Grounding.shown`` is empty (the
    caller answers "not found"). 400 without an index, with tools, when the last message is not the
    user's, for bad options; ``context_length_exceeded`` when the question leaves no room."""
    if index is None:
        raise bad_request(
            "this server has no index: start it with lamina serve MODEL --index PATH (an index of "
            "lamina index), or leave rag out",
            param="rag",
        )
    if req.tools:
        raise bad_request("rag cannot be combined with tools; send one or the other", param="rag")
    constraint = output_constraint(req)
    if constraint is not None:
        raise bad_request(
            f"rag cannot be combined with {constraint}: a grounded answer cites its sources as [n] in "
            f"free text, which {constraint} would not allow; send one or the other",
            param="rag",
        )
    options = rag_options(req.rag)
    last = req.messages[-1]
    if last.role != "user":
        raise bad_request(
            f"rag answers the last message, which must be the user's question (it is {last.role!r})",
            param=f"messages[{len(req.messages) - 1}]",
        )
    content = last.content
    question = content if isinstance(content, str) else "".join(p.text or "" for p in content or [])
    if not question.strip():
        raise bad_request("rag needs a question: the last message is empty", param="messages")
    if len(question) > MAX_QUERY_CHARS:
        raise bad_request(
            f"rag's question (the last message) has {len(question)} characters, more than a retrieval "
            f"query may have ({MAX_QUERY_CHARS}); shorten it",
            param=f"messages[{len(req.messages) - 1}].content",
        )
    hits = index.search(question, options, limits)
    if not hits:
        return Grounding(req, [], [])
    lm = served.lm
    earlier = [{"role": m.role, "content": _text(m.content)} for m in req.messages[:-1]]
    used = 0
    if earlier and lm.tokenizer is not None and lm.tokenizer.chat_template is not None:
        from lamina.generate.text import build_prompt_ids

        try:
            used = len(build_prompt_ids(lm, earlier, chat=True))
        except Exception:  # the template refuses this history alone: prepare_chat will say why
            used = 0
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    answer = asked or SynthesizeConfig.max_new_tokens
    window = served.context_length - used
    try:
        cfg = SynthesizeConfig(max_new_tokens=answer, context_window=window)
        prompt, shown = compact_prompt(lm, question, hits, cfg)
    except ConfigError:
        raise context_length_exceeded(
            f"This model's maximum context length is {served.context_length} tokens: after the earlier "
            f"messages ({used} tokens) and the answer (max_tokens={answer}) the question with its sources "
            "does not fit; shorten the conversation or the question, or lower max_tokens"
        ) from None
    messages = [*req.messages[:-1], last.model_copy(update={"content": prompt})]
    return Grounding(req.model_copy(update={"messages": messages}), shown, hits)


def output_constraint(req: ChatCompletionRequest) -> str | None:
    """The name of the output constraint ``req`` sets (``response_format`` json_object / json_schema, or
    the extra fields choices, json_schema, regex, grammar and vLLM's guided_* names), else None."""
    if req.response_format is not None and req.response_format.type != "text":
        return f"response_format {req.response_format.type!r}"
    extra = req.model_extra or {}
    return next((k for k in (*_CONSTRAINTS, *_ALIASES) if extra.get(k) is not None), None)


def rag_options(rag: bool | dict[str, Any] | None) -> RagOptions:
    """A request's ``rag`` field as options (``true``: every default); 400 naming the bad field."""
    if not isinstance(rag, dict):
        return RagOptions()
    try:
        return RagOptions.model_validate(rag)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in ("rag", *first["loc"]))
        raise bad_request(f"Invalid value for {where!r}: {first['msg']}", param=where) from None


def _text(content: Any) -> str:
    return content if isinstance(content, str) else "".join(p.text or "" for p in content or [])


def grounded_response(resp: ChatCompletionResponse, grounding: Grounding) -> GroundedChatCompletionResponse:
    """``resp`` with each choice's citations read from its text (markers naming no shown passage removed)
    and the sources shown."""
    choices = []
    for c in resp.choices:
        answer = cite(c.message.content or "", grounding.shown)
        message = c.message.model_copy(update={"content": answer.text})
        choices.append(
            GroundedChatChoice(
                **{**c.model_dump(exclude={"message"}), "message": message},
                citations=[x.number for x in answer.citations],
                dropped_citations=answer.dropped_citations,
            )
        )
    return GroundedChatCompletionResponse(
        **resp.model_dump(exclude={"choices"}), choices=choices, sources=grounding.sources
    )


def not_found(model: str, n: int) -> GroundedChatCompletionResponse:
    """The answer when retrieval found nothing: "Not found in the sources.", no model call."""
    choices = [
        GroundedChatChoice(index=k, message=ChatMessageOut(content=NOT_FOUND), finish_reason="stop")
        for k in range(n)
    ]
    return GroundedChatCompletionResponse(
        id=new_id("chatcmpl"), created=int(time.time()), model=model, choices=choices,
        usage=Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0), sources=[],
    )  # fmt: skip


async def not_found_stream(model: str, n: int, include_usage: bool) -> AsyncIterator[str]:
    """``not_found`` as SSE chunks: the role with ``sources: []``, the text, the finish with no citations."""
    rid, created = new_id("chatcmpl"), int(time.time())
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
    extra: dict[str, Any] = {"usage": None} if include_usage else {}

    def event(choices: list[dict[str, Any]], **more: Any) -> str:
        return f"data: {json.dumps({**head, 'choices': choices, **more, **extra})}\n\n"

    for k in range(n):
        yield event([{"index": k, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
                    sources=[])  # fmt: skip
        yield event([{"index": k, "delta": {"content": NOT_FOUND}, "finish_reason": None}])
        yield event(
            [{"index": k, "delta": {}, "finish_reason": "stop", "citations": [], "dropped_citations": 0}]
        )
    if include_usage:
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage})}\n\n"
    yield DONE


def raise_for_rag(index: ServedIndex | None) -> ServedIndex:
    """The index, or the 400 a retrieve request gets on a server without one."""
    if index is None:
        raise APIError(
            400,
            "this server has no index: start it with lamina serve MODEL --index PATH (an index of lamina "
            "index) to use /v1/retrieve",
            code="no_index",
        )
    return index
