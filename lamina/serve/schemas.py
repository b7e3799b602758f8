"""Request and response bodies of the OpenAI-compatible routes, as pydantic models.

Requests follow OpenAI's API reference (field names, types, ranges and defaults); values are checked
strictly (``"n": "2"`` is a type error, as it is for OpenAI) and every failure becomes a 400 with OpenAI's
error body (``lamina.serve.errors``). Limits that are server settings (``n``, ``logit_bias`` size, token
counts) are checked by the routes, which know them.

Beyond OpenAI's fields, a request may carry lamina's decoding controls as extra fields, as vLLM accepts
its sampling parameters: the common ones are declared here (``top_k``, ``min_p``, ``repetition_penalty``,
``stop_token_ids``, ``min_tokens``, ``ignore_eos``, ...) and any other ``GenerationConfig`` field (e.g.
``dry_multiplier``, ``mirostat``, ``choices``) is passed through by name. Any other unknown field is
refused (400 "Unrecognized request argument supplied"), as OpenAI refuses it.

Responses are OpenAI's: ``text_completion`` / ``chat.completion`` objects, their streamed ``chunk``
forms, ``usage``, legacy completions ``logprobs`` (``tokens``, ``token_logprobs``, ``top_logprobs``,
``text_offset``) and chat ``logprobs.content``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# -- requests -----------------------------------------------------------------------------------------------


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` adds a last chunk with ``usage`` (and ``"usage": null`` before)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: bool = False


class ResponseFormat(BaseModel):
    """``response_format``: ``{"type": "text"}``, ``{"type": "json_object"}`` (the output is one JSON object)
    or ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": true}}`` (the
    output validates under ``schema``)."""

    model_config = ConfigDict(strict=True, extra="allow")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class SamplingExtras(_Request):
    """lamina's (and vLLM's) decoding controls beyond OpenAI's; any other GenerationConfig field also works."""

    top_k: int | None = Field(default=None, ge=0, description="keep the k most likely tokens (0 = off)")
    min_p: float | None = Field(default=None, ge=0, le=1, description="min-p truncation (0 = off)")
    typical_p: float | None = Field(
        default=None, gt=0, le=1, description="locally typical sampling (1 = off)"
    )
    repetition_penalty: float | None = Field(
        default=None, gt=0, description="HF multiplicative penalty (1 = off)"
    )
    stop_token_ids: list[int] | None = Field(
        default=None, description="token ids that end a sequence, like eos"
    )
    min_tokens: int | None = Field(
        default=None, ge=0, description="at least this many tokens (eos banned before)"
    )
    ignore_eos: bool | None = Field(default=None, description="keep generating past eos")
    include_stop_str_in_output: bool | None = Field(
        default=None, description="keep the stop string in the text"
    )
    prompt_logprobs: int | None = Field(
        default=None, ge=0, description="vLLM: logprobs of the prompt tokens with this many alternatives"
    )
    return_tokens_as_token_ids: bool | None = Field(
        default=None, description='vLLM: logprobs name tokens as "token_id:ID" (exact, unlike their text)'
    )
    use_beam_search: bool | None = Field(
        default=None,
        description="vLLM: beam search with num_beams = max(best_of or n, 2), the n best beams returned "
        "(no streaming); lamina's num_beams extra field sets the width directly",
    )


class CompletionRequest(SamplingExtras):
    """``POST /v1/completions`` (OpenAI legacy completions)."""

    model: str
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="a string, a list of strings, a list of token ids, or a list of token-id lists"
    )
    max_tokens: int | None = Field(16, ge=0, description="tokens to generate (default 16, as OpenAI)")
    temperature: float | None = Field(default=None, ge=0, le=2, description="0 = greedy; default 1")
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = Field(default=None, ge=1, description="completions per prompt")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(
        default=None, ge=0, description="logprobs of each token and of this many alternatives"
    )
    echo: bool | None = Field(False, description="prepend the prompt (and its logprobs with logprobs)")
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    best_of: int | None = Field(default=None, ge=1, description="only best_of = n is supported")
    logit_bias: dict[str, float] | None = Field(
        default=None, description="token id (as a string) -> bias in [-100, 100]"
    )
    user: str | None = None
    seed: int | None = Field(
        default=None, ge=-(2**63), le=2**64 - 1, description="64-bit; same seed, same text"
    )
    suffix: str | None = Field(default=None, description="not supported (400 when given)")
    response_format: ResponseFormat | None = None
    split_special_tokens: bool = Field(
        default=False,
        description="lamina: special-token text in a string prompt stays plain text (default: it becomes "
        "the token, as in transformers; chat messages are always plain text)",
    )


class TextPart(BaseModel):
    """A part of a message's content; only ``{"type": "text", "text": ...}`` parts are supported."""

    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """One chat message; ``content`` is a string or a list of text parts."""

    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers


MAX_FILTER_KEYS = 16  # keys of one filters object
MAX_FILTER_VALUES = 1000  # values of one filter key's list (SQLite binds at most 32,766 per query)
MAX_QUERY_CHARS = (
    8000  # a retrieval query (embedded, and one full-text OR term per word, under the index lock)
)
Scalar = str | int | float | bool
FilterValue = Scalar | list[Scalar]


class RagOptions(BaseModel):
    """lamina: how a request retrieves from the server's index (``--index``); each field left out takes
    ``lamina.rag.retrieve.RetrieveConfig``'s default (dense, 5 passages, no filters, no threshold)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    top_k: int | None = Field(
        default=None, ge=1, description="passages retrieved (the server's limit: max_retrieve_top_k)"
    )
    mode: Literal["dense", "bm25", "hybrid"] | None = Field(
        default=None, description="dense (embeddings), bm25 (full text) or hybrid (both, scores fused)"
    )
    filters: dict[str, FilterValue] | None = Field(
        default=None,
        description="metadata filters: {key: value} or {key: [any of these]}; doc_id, doc_id_prefix and kind "
        f"match the chunk's own fields (lamina.rag.types.FILTERS_HELP); at most {MAX_FILTER_KEYS} keys, "
        f"{MAX_FILTER_VALUES} values a key, integers within int64",
    )
    score_threshold: float | None = Field(
        default=None, description="minimum score (cosine for dense/hybrid, BM25 for bm25): below it, nothing"
    )

    @field_validator("filters")
    @classmethod
    def _bounded(cls, filters: dict[str, FilterValue] | None) -> dict[str, FilterValue] | None:
        """What the stores can bind: a bounded number of keys and values, int64 integers, finite floats."""
        if filters is None:
            return None
        if len(filters) > MAX_FILTER_KEYS:
            raise ValueError(f"{len(filters)} filter keys, at most {MAX_FILTER_KEYS} are allowed")
        for key, want in filters.items():
            values = want if isinstance(want, list) else [want]
            if len(values) > MAX_FILTER_VALUES:
                raise ValueError(
                    f"filter {key!r} has {len(values)} values, at most {MAX_FILTER_VALUES} are allowed"
                )
            for v in values:
                if isinstance(v, int) and not isinstance(v, bool) and not -(2**63) <= v < 2**63:
                    raise ValueError(f"filter {key!r}: the integer {v} is outside int64")
                if isinstance(v, float) and not math.isfinite(v):
                    raise ValueError(f"filter {key!r}: {v} is not a finite number")
        return filters


class RetrieveRequest(RagOptions):
    """``POST /v1/retrieve`` (lamina): the passages of the server's index that best answer ``query``."""

    query: str = Field(min_length=1, max_length=MAX_QUERY_CHARS)


class ChatCompletionRequest(SamplingExtras):
    """``POST /v1/chat/completions``."""

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(
        default=None, ge=0, description="deprecated by OpenAI for max_completion_tokens"
    )
    max_completion_tokens: int | None = Field(
        default=None, ge=0, description="default: the rest of the context"
    )
    temperature: float | None = Field(default=None, ge=0, le=2, description="0 = greedy; default 1")
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = Field(default=None, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0)
    user: str | None = None
    seed: int | None = Field(
        default=None, ge=-(2**63), le=2**64 - 1, description="64-bit; same seed, same text"
    )
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = Field(default=None, description="functions the model may call")
    tool_choice: Any = Field(default=None, description='"none", "auto" (default), "required" or a function')
    parallel_tool_calls: bool | None = Field(
        default=None, description="several calls in one answer (default)"
    )
    store: bool | None = Field(default=None, description="accepted and ignored")
    metadata: dict[str, Any] | None = Field(default=None, description="accepted and ignored")
    service_tier: str | None = Field(default=None, description="accepted and ignored")
    rag: bool | dict[str, Any] | None = Field(
        default=None,
        description="lamina: ground the answer on the server's index (--index): true, or retrieval options "
        "(RagOptions: top_k, mode, filters, score_threshold); "
        "the last message (the user's question) is answered from the passages retrieved for it, citing "
        "them as [1], [2]; the response's sources list them and each choice's citations name those cited",
    )


class EmbeddingRequest(_Request):
    """``POST /v1/embeddings``."""

    model_config = ConfigDict(strict=True, extra="forbid")
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: int | None = Field(
        default=None, ge=1, description="must equal the model's dimension when given"
    )
    user: str | None = None
    truncate: bool = Field(
        default=False,
        description="lamina (as TEI's truncate): cut inputs over the model's limit instead of refusing "
        "them (400 context_length_exceeded); the response's truncated_inputs lists the inputs cut",
    )


# -- responses -----------------------------------------------------------------------------------------------


class Usage(BaseModel):
    """Token counts of a request (prompt once per prompt, completion over every choice)."""

    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """Legacy completions logprobs: one entry per token (the echoed prompt's first token has None)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    """One completion (choice ``index`` = prompt index * n + sequence index)."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    stop_reason: str | int | None = Field(
        default=None, description="vLLM: the stop string or token that ended it"
    )


class CompletionResponse(BaseModel):
    """A ``text_completion`` object (also each streamed chunk)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class TopLogprob(BaseModel):
    """A candidate token with its logprob (chat ``logprobs``)."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    """A generated token, its logprob and the most likely alternatives."""

    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    """Chat ``logprobs``: one entry per generated token."""

    content: list[ChatTokenLogprob] | None = None


class ChatMessageOut(BaseModel):
    """The assistant's message."""

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # lamina.serve.tools: id, type, function name/arguments


class ChatChoice(BaseModel):
    """One chat completion."""

    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None


class ChatCompletionResponse(BaseModel):
    """A ``chat.completion`` object."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatDelta(BaseModel):
    """What a streamed chunk adds to a choice's message."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # streamed calls: index, id, type, function


class ChatChunkChoice(BaseModel):
    """One choice's part of a streamed chunk."""

    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None


class ChatCompletionChunk(BaseModel):
    """A ``chat.completion.chunk`` (server-sent event ``data:``)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    """One served model (``GET /v1/models``); ``kind`` and ``max_model_len`` are lamina's additions."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lamina"
    kind: Literal["generation", "embedding"]
    max_model_len: int
    root: str | None = Field(default=None, description="where the model was loaded from")
    parent: str | None = Field(default=None, description="a LoRA adapter's base model (vLLM's field)")


class ModelList(BaseModel):
    """``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class Embedding(BaseModel):
    """One input's vector (a list of floats, or base64 of little-endian float32)."""

    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingResponse(BaseModel):
    """``POST /v1/embeddings``; ``usage.prompt_tokens`` counts the tokens embedded (after any cut)."""

    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage
    truncated_inputs: list[int] | None = Field(
        default=None,
        description="lamina, only with truncate=true: the indices of the inputs cut to the model's limit "
        "(their number is also the X-Truncated-Inputs header)",
    )


class Passage(BaseModel):
    """A retrieved passage: ``number`` is its rank, which is also the [n] a grounded answer cites it by;
    ``document`` its document's id, ``span`` its [start, end) character offsets in that document's text,
    ``page`` its PDF page (else null), ``score`` as the retrieval mode scores (higher is better)."""

    number: int
    document: str
    chunk_id: str
    title: str
    text: str
    span: tuple[int, int]
    page: int | None = None
    score: float


class RetrieveResponse(BaseModel):
    """``POST /v1/retrieve``: the passages, best first, and how they were found."""

    object: Literal["list"] = "list"
    data: list[Passage]
    mode: Literal["dense", "bm25", "hybrid"]
    embedding_model: str


class GroundedChatChoice(ChatChoice):
    """A grounded chat completion: ``citations`` are the numbers of the ``sources`` its text cites, in order
    of first mention (a marker naming no source shown is removed from the text and counted in
    ``dropped_citations``)."""

    citations: list[int] = Field(default_factory=list)
    dropped_citations: int = 0


class GroundedChatCompletionResponse(ChatCompletionResponse):
    """A ``chat.completion`` of a request with ``rag``: ``sources`` are the passages the prompt showed,
    numbered as the answer cites them (empty, and the answer "Not found in the sources.", when retrieval
    found nothing)."""

    choices: list[GroundedChatChoice]  # type: ignore[assignment]
    sources: list[Passage]


class ErrorDetail(BaseModel):
    """OpenAI's error object."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error body: ``{"error": {...}}``."""

    error: ErrorDetail


class Health(BaseModel):
    """``GET /health``."""

    status: Literal["ok", "error"]
    models: list[str]
    running: int
    queued: int
