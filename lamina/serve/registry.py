"""The models a server serves, by name, each of one kind.

- ``generation`` (decoder and encoder-decoder models): a ``Scheduler`` over an ``Engine`` does continuous
  batching; they answer ``/v1/completions`` (an encoder-decoder's prompt is its source) and
  ``/v1/chat/completions`` (with a chat template).
- ``embedding`` (encoder models such as ``minilm``): ``lamina.embeddings.embed_texts`` pools their hidden
  states; they answer ``/v1/embeddings``.

The kind follows the model's ``ModelConfig.arch`` (decoder, encoder-decoder / encoder). Asking a model for
what its kind does not do answers 400 ("model X does not support embeddings"); an unknown name answers 404.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from lamina.checkpoint.load import LoadedModel, load
from lamina.errors import ConfigError
from lamina.generate.engine import Engine
from lamina.generate.text import resolve_draft
from lamina.serve.errors import APIError, model_not_found
from lamina.serve.metrics import Metrics
from lamina.serve.scheduler import Scheduler
from lamina.serve.settings import ServeConfig

if TYPE_CHECKING:
    from lamina.embeddings import Embeddings
    from lamina.model.transformer import Transformer

Kind = Literal["generation", "embedding"]
_ROUTES = {"generation": "completions and chat completions", "embedding": "embeddings"}


@dataclass(eq=False)
class ServedModel:
    """One served model: its name, kind, the loaded model and (generation) its scheduler."""

    name: str
    kind: Kind
    lm: LoadedModel
    created: int = field(default_factory=lambda: int(time.time()))
    scheduler: Scheduler | None = None
    adapter: int = 0  # a LoRA adapter's index in its parent's model (0: the model itself)
    parent: str | None = None  # a LoRA adapter's base model name
    root: str | None = None  # where a LoRA adapter was loaded from
    _embed_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def context_length(self) -> int:
        """The model's context window in tokens (``max_seq_len``)."""
        return self.lm.model.config.max_seq_len

    @property
    def vocab_size(self) -> int:
        """Token ids run from 0 to ``vocab_size - 1``."""
        return self.lm.model.config.vocab_size

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one cache per served model, they live as long as the server
    def token_str(self, token: int) -> str:
        """How a token reads on its own (logprobs ``tokens``): its decoded text, special tokens included."""
        tok = self.lm.tokenizer
        return f"token_id:{token}" if tok is None else tok.decode([token])

    def embed(self, texts: Sequence[str], truncate: bool = False) -> Embeddings:
        """The embeddings of ``texts`` (vectors (N, dim) float32, token counts, which were cut); one batch
        at a time per model. Raises ``InputTooLongError`` for a text over the limit unless ``truncate``."""
        from lamina.embeddings import embed_texts

        with self._embed_lock:
            return embed_texts(self.lm, texts, truncate=truncate)


class Registry:
    """Served models by name (``add``), their schedulers' lifecycle (``start`` / ``stop``) and lookup."""

    def __init__(self, config: ServeConfig | None = None, metrics: Metrics | None = None) -> None:
        self.config = config or ServeConfig()
        self.metrics = metrics or Metrics()
        self._models: dict[str, ServedModel] = {}
        self._drafts: dict[str, LoadedModel] = {}  # draft models by name, loaded once

    def add(self, name: str, lm: LoadedModel, kind: Kind | None = None) -> ServedModel:
        """Serve ``lm`` as ``name``; ``kind`` defaults from the architecture (decoder, encoder-decoder:
        generation; encoder: embedding)."""
        if not name:
            raise ConfigError("a served model needs a non-empty name")
        if name in self._models:
            raise ConfigError(f"two served models are named {name!r}; give --served-model-name for one")
        arch = lm.model.config.arch
        kind = kind or ("embedding" if arch == "encoder" else "generation")
        if kind == "generation" and arch not in ("decoder", "encoder-decoder"):
            raise ConfigError(
                f"model {name!r} (arch={arch!r}) cannot generate text (serve it for embeddings)"
            )
        if kind == "embedding" and lm.tokenizer is None:
            raise ConfigError(f"model {name!r} has no tokenizer: embeddings need one")
        served = ServedModel(name, kind, lm)
        if kind == "generation":
            cfg = self.config
            draft = self._draft(lm)

            def make_engine() -> Engine:
                return Engine(
                    lm.model,
                    lm.tokenizer,
                    lm.generation.eos_token_ids,
                    max_batch_size=cfg.max_batch_size,
                    max_tokens_in_flight=cfg.max_tokens_in_flight,
                    draft=draft,
                    num_draft_tokens=cfg.num_draft_tokens,
                    prefix_cache_mib=cfg.prefix_cache_mib if cfg.enable_prefix_caching else 0.0,
                    pad_shapes=cfg.pad_shapes,
                )

            served.scheduler = Scheduler(
                make_engine, name=name, metrics=self.metrics, max_queue=cfg.max_queue, timeout=cfg.timeout
            )
        self._models[name] = served
        return served

    def add_adapter(self, name: str, path: str, base: str | None = None) -> ServedModel:
        """Serve the PEFT LoRA adapter at ``path`` as ``name`` over the generation model ``base`` (default:
        the first one added), as vLLM's ``--lora-modules`` does; add adapters before the server starts.

        The adapter shares its base's weights, scheduler and running batch: each request's rows select
        its adapter in the LoRA layers (``lamina.model.lora.MultiLoraLinear``), so base and adapter
        requests decode together and each gets what it would get alone. ``/v1/models`` lists it with
        ``parent`` (the base's name) and ``root`` (``path``).

        Raises ``ConfigError`` for a taken name, an unknown or non-generation base, a base whose
        projections were fused (``lamina.checkpoint.peft.load_adaptable`` loads one that adapters fit), and
        ``CheckpointError`` for an adapter that does not fit the base."""
        from lamina.checkpoint.peft import add_serving_adapter

        if name in self._models:
            raise ConfigError(f"two served models are named {name!r}; rename the adapter")
        bases = [m for m in self._models.values() if m.kind == "generation" and m.parent is None]
        if base is None:
            if not bases:
                raise ConfigError(f"adapter {name!r} needs a generation model to serve it over")
            parent = bases[0]
        else:
            found = self._models.get(base)
            if found is None or found not in bases:
                raise ConfigError(
                    f"adapter {name!r}: base_model_name={base!r} is not a served generation model "
                    f"({', '.join(m.name for m in bases) or 'none'})"
                )
            parent = found
        k = add_serving_adapter(parent.lm.model, name, path)
        served = ServedModel(name, "generation", parent.lm, scheduler=parent.scheduler)
        served.adapter, served.parent, served.root = k, parent.name, path
        self._models[name] = served
        return served

    def _draft(self, lm: LoadedModel) -> Transformer | None:
        """The draft of a generation model (``ServeConfig.draft`` loaded once, or its first
        ``speculative_layers`` layers); None without speculative decoding."""
        cfg = self.config
        if cfg.draft is not None and cfg.draft not in self._drafts:
            self._drafts[cfg.draft] = load(cfg.draft)
        draft = self._drafts[cfg.draft] if cfg.draft is not None else None
        return resolve_draft(lm, draft, cfg.speculative_layers)

    @property
    def names(self) -> list[str]:
        """Served model names, in the order they were added."""
        return list(self._models)

    def models(self) -> list[ServedModel]:
        """Every served model."""
        return list(self._models.values())

    def get(self, name: str, kind: Kind | None = None) -> ServedModel:
        """The model called ``name`` (404 if none), which must be of ``kind`` when given (400 if not). A
        LoRA adapter also answers to ``BASE:ADAPTER`` (its parent's name, a colon, its own)."""
        served = self._models.get(name)
        if served is None and ":" in name:
            base, _, adapter = name.rpartition(":")
            found = self._models.get(adapter)
            served = found if found is not None and found.parent == base else None
        if served is None:
            raise model_not_found(name, self.names)
        if kind is not None and served.kind != kind:
            others = [m.name for m in self._models.values() if m.kind == kind]
            hint = f"; models that do: {', '.join(others)}" if others else ""
            article = "an" if served.kind[0] in "aeiou" else "a"
            raise APIError(
                400,
                f"The model {name!r} is {article} {served.kind} model: it does not support {_ROUTES[kind]}{hint}",
                param="model",
                code="model_not_supported",
            )
        return served

    def start(self) -> None:
        """Start every generation model's engine thread."""
        for m in self._models.values():
            if m.scheduler is not None and m.parent is None:
                m.scheduler.start()

    def stop(self) -> None:
        """Stop every engine thread."""
        for m in self._models.values():
            if m.scheduler is not None and m.parent is None:
                m.scheduler.stop()
