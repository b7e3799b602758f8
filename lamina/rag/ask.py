"""Ask an index a question: retrieval, then an answer with numbered citations.

    import lamina.rag
    result = lamina.rag.ask("How do I read a CSV file with a header row?", index="stdlib-docs.sqlite")
    print(result.answer.text)
    for c in result.answer.citations:
        print(c.number, c.doc_id, c.start, c.end, c.page)

The question is embedded with the model the index was built with (``store.embedding_model``; another model
is refused naming both), the passages are retrieved as ``RetrieveConfig`` says (dense by default) and a
chat model (SmolLM2 by default) writes the answer as ``SynthesizeConfig`` says
(:mod:`lamina.rag.retrieve`, :mod:`lamina.rag.synthesize`). When nothing is retrieved (or nothing reaches
``score_threshold``) the answer is "Not found in the sources." and the chat model is not loaded.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lamina.rag.retrieve import RetrieveConfig, retrieve
from lamina.rag.synthesize import NOT_FOUND, Answer, SynthesizeConfig, synthesize
from lamina.rag.types import Hit, Store

if TYPE_CHECKING:
    from lamina.checkpoint.load import LoadedModel

DEFAULT_MODEL = "smollm2"


@dataclass
class AskResult:
    """The answer (text, citations, the passages shown) and every retrieved hit with its score."""

    answer: Answer
    hits: list[Hit] = field(default_factory=list)


def ask(
    question: str,
    index: str | os.PathLike[str] | Store | None = None,
    model: str | LoadedModel = DEFAULT_MODEL,
    retrieve_config: RetrieveConfig | None = None,
    synthesize_config: SynthesizeConfig | None = None,
    stream: Callable[[str], None] | None = None,
    embedder: LoadedModel | None = None,
    **controls: Any,
) -> AskResult:
    """Answer ``question`` from ``index`` with ``model``, citing the passages as [1], [2] ...

    ``index``: an open store, a SQLite file or a ``postgresql://`` URL (None: the default index that
    ``lamina index`` writes, :func:`default_index`). ``model``: the chat model (name, path or loaded).
    ``embedder``: the index's embedding model, loaded (None: loaded from the name the index stores).
    ``stream`` receives the answer's text as it is written; ``controls`` are further decoding controls
    (``GenerationConfig`` fields). ``rerank="llm"`` or ``"likelihood"`` reranks with ``model``. Raises ``ConfigError`` for a query embedder that is not the index's
    model and for a missing index file.
    """
    from lamina.checkpoint.load import load

    cfg = retrieve_config or RetrieveConfig()
    lm: LoadedModel | None = None
    if cfg.rerank != "none":  # the chat model scores the passages too
        lm = load(model) if isinstance(model, str) else model
    store, owned = _open(index)
    try:
        hits = retrieve(store, question, cfg, embedder, reranker=lm)
    finally:
        if owned:
            store.close()
    if not hits:
        return AskResult(Answer(NOT_FOUND, found=False), [])
    if lm is None:
        lm = load(model) if isinstance(model, str) else model
    return AskResult(synthesize(lm, question, hits, synthesize_config, stream=stream, **controls), hits)


def default_index() -> str:
    """Where ``lamina index`` writes when not told (``lamina.rag.index.default_index``)."""
    from lamina.rag.index import default_index as where

    return str(where())


def _open(index: str | os.PathLike[str] | Store | None) -> tuple[Store, bool]:
    from pathlib import Path

    from lamina.errors import ConfigError
    from lamina.rag.store import is_postgres, open_store

    if index is not None and not isinstance(index, (str, os.PathLike)):
        return index, False
    location = default_index() if index is None else index
    if not is_postgres(location) and not Path(location).is_file():
        raise ConfigError(
            f"no index at {location}: build one with `lamina index PATH` (or `lamina index --builtin "
            "stdlib-docs`), or pass --index FILE"
        )
    return open_store(location), True
