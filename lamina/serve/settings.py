"""``ServeConfig``: every setting of ``lamina serve`` (binding, auth, batching, limits) in one dataclass."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Literal

from lamina.errors import ConfigError
from lamina.fields import SIZE
from lamina.generate.speculative import SpeculativeOptions


@dataclass
class ServeConfig:
    """How the server binds, whom it serves, how it batches, and what it refuses.

    - ``host`` ["127.0.0.1": loopback only; "0.0.0.0" to listen on every interface], ``port`` [8000].
    - ``api_keys`` [[]]: when non-empty, every ``/v1/*`` request needs ``Authorization: Bearer KEY``
      with one of them (401 otherwise). ``lamina serve`` also reads ``LAMINA_API_KEY``.
    - ``max_batch_size`` [32]: sequences decoded together; ``max_tokens_in_flight`` [None = no limit]:
      the sum of prompt + completion tokens of the running sequences (a request needing more is
      refused with 400, others wait in the queue).
    - ``max_queue`` [256]: requests waiting to join the batch; beyond it requests get 429 with
      ``Retry-After``. ``timeout`` [600 s; None = none]: from a request's arrival to its last token
      (504 after it).
    - limits of one request, each refused with 400: ``max_n`` [16] (``n``), ``max_logit_bias`` [300
      entries, values in [-100, 100]], ``max_top_logprobs`` [20], ``max_stop`` [16 stop strings],
      ``max_prompts`` [64 prompts per completions request], ``max_embedding_inputs`` [2048],
      ``max_request_bytes`` [4 MiB of JSON body]. ``max_tokens`` is limited by the model's context window
      (prompt + max_tokens > context: 400 ``context_length_exceeded``); an encoder-decoder's source by
      ``max_source_tokens`` [None = the model's ``max_seq_len``] (longer: 400 ``context_length_exceeded``).
    - ``enable_prefix_caching`` [True]: requests that share a prompt prefix reuse its keys and values,
      at most ``prefix_cache_mib`` [256] MiB per model (``lamina.generate.prefix_cache``).
    - ``pad_shapes`` [True]: decoding steps and prefills run padded batch sizes and prompt lengths
      (``lamina.generate.engine.batch_rows``, ``prefill_tokens``), so the memory kept per matmul shape
      stays bounded; the same tokens up to float rounding (the row count changes which matmul kernel
      runs).
    - speculative decoding of greedy requests (``SpeculativeOptions``): ``draft`` [None] a draft model,
      or ``speculative_layers`` [None] the served model's own first K layers; ``num_draft_tokens`` [4].
    - retrieval: ``index`` [None] an index of ``lamina index`` (SQLite file or ``postgresql://`` URL) for
      ``POST /v1/retrieve`` and grounded chat (``lamina.serve.grounding``); ``max_retrieve_top_k`` [100].
    """

    host: str = "127.0.0.1"  # address to listen on: 127.0.0.1 loopback only, 0.0.0.0 every interface
    port: int = 8000  # TCP port to listen on, in [0, 65535]
    # the path prefix a reverse proxy serves lamina under when it strips it before forwarding (e.g. /lamina):
    # links and OpenAPI pages then carry it (uvicorn's root_path); "" when served at the root
    root_path: str = ""
    # when non-empty, every /v1/* request needs "Authorization: Bearer KEY" with one of them (else 401);
    # with none given, lamina serve reads LAMINA_API_KEY (keys separated by commas)
    api_keys: list[str] = field(default_factory=list, metadata={"secret": True})
    max_batch_size: int = 32  # sequences decoded together, >= 1
    # most prompt + completion tokens of the running sequences together, >= 2 (None: no limit); a request
    # that needs more alone is refused with 400, others wait in the queue
    max_tokens_in_flight: int | None = None
    # most source (prompt) tokens of an encoder-decoder's request, >= 1; more: 400 (None: the model's
    # max_seq_len); T5's relative positions take longer sources, encoded in one go (memory ~ length squared)
    max_source_tokens: int | None = None
    max_queue: int = 256  # requests waiting to join the batch, >= 1; beyond it 429 with Retry-After
    timeout: float | None = 600.0  # seconds from a request's arrival to its last token, then 504 (None: none)
    max_n: int = 16  # most sequences one request may ask for (n), >= 1; more: 400
    max_logit_bias: int = 300  # most logit_bias entries per request (values in [-100, 100]), >= 0; more: 400
    max_top_logprobs: int = 20  # most alternatives per token (top_logprobs, prompt_logprobs), >= 0; more: 400
    max_stop: int = 16  # most stop strings per request, >= 0; more: 400
    max_prompts: int = 64  # most prompts in one completions request, >= 1; more: 400
    max_embedding_inputs: int = 2048  # most inputs in one embeddings request, >= 1; more: 400
    # largest JSON request body in bytes (sizes such as 4MiB accepted), >= 1024; larger: 400
    max_request_bytes: int = field(default=4 * 1024 * 1024, metadata=SIZE)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"  # uvicorn's log level
    # speculative decoding of greedy requests: a draft model (name or path) with the served models' vocabulary
    draft: str | None = None
    # self-speculative decoding of greedy requests: each served model's own first K layers are its draft
    speculative_layers: int | None = None
    num_draft_tokens: int = SpeculativeOptions.num_draft_tokens  # draft tokens proposed per step, >= 1
    # reuse the keys and values of prompt prefixes shared across requests (a system prompt, earlier turns):
    # only the rest of a prompt is prefilled (vLLM's --enable-prefix-caching); the output does not change
    enable_prefix_caching: bool = True
    prefix_cache_mib: float = 256.0  # most MiB of cached prefix keys and values per model, > 0; LRU eviction
    # decoding steps run 1, 2, 4, 8, then a multiple of 8 rows and prefills 8, 16, 32, 64, then a multiple
    # of 64 tokens per row (padding; the same tokens up to float rounding): the matmul shapes, and the memory
    # oneDNN keeps per shape, stay a small set (fp32, bf16); false, and int8/int4/w8a8 weights: exact shapes
    pad_shapes: bool = True
    # LoRA adapters served over a MODEL, each chosen per request by its name (vLLM's --lora-modules):
    # NAME=PATH over the first MODEL ('[a=PATH, b=PATH]' for several), or a JSON object string
    # '{"name": ..., "path": ..., "base_model_name": MODEL}' as an item
    lora_modules: list[str] = field(default_factory=list)
    # the index to retrieve from (a SQLite file or a postgresql:// URL written by lamina index): POST
    # /v1/retrieve and chat completions with "rag" grounded on it
    index: str | None = None
    max_retrieve_top_k: int = 100  # most passages a retrieve or grounded chat request may ask for, >= 1

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "max_n", "max_prompts", "max_embedding_inputs",
                     "max_retrieve_top_k"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("max_logit_bias", "max_top_logprobs", "max_stop"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0")
        if self.prefix_cache_mib <= 0:
            raise ConfigError(
                f"prefix_cache_mib={self.prefix_cache_mib} must be > 0 (turn caching off with "
                "enable_prefix_caching=false)"
            )
        if self.max_request_bytes < 1024:
            raise ConfigError(f"max_request_bytes={self.max_request_bytes} must be >= 1024")
        if self.timeout == 0:  # 0 means no timeout, as for uvicorn and most servers
            self.timeout = None
        if self.timeout is not None and self.timeout <= 0:
            raise ConfigError(f"timeout={self.timeout} must be > 0 seconds (or None: no timeout)")
        if self.max_source_tokens is not None and self.max_source_tokens < 1:
            raise ConfigError(f"max_source_tokens={self.max_source_tokens} must be >= 1 (or None)")
        if self.max_tokens_in_flight is not None and self.max_tokens_in_flight < 2:
            raise ConfigError(f"max_tokens_in_flight={self.max_tokens_in_flight} must be >= 2 (or None)")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port={self.port} must be in [0, 65535]")
        if self.root_path and (not self.root_path.startswith("/") or self.root_path.endswith("/")):
            raise ConfigError(
                f"root_path={self.root_path!r} must start with / and not end with one (e.g. /lamina)"
            )
        if any(not k for k in self.api_keys):
            raise ConfigError("api_keys must not hold empty strings")
        SpeculativeOptions(self.draft, self.speculative_layers, self.num_draft_tokens)  # validates them
        adapters = self.adapters()
        if adapters and self.speculative_layers is not None:
            raise ConfigError(
                "speculative_layers shares the served model's layers, which lora_modules adapt: use a "
                "separate --draft model, or no speculative decoding, with LoRA adapters"
            )
        names = [a[0] for a in adapters]
        if len(set(names)) < len(names):
            raise ConfigError(f"lora_modules names an adapter twice: {names}")

    def adapters(self) -> list[tuple[str, str, str | None]]:
        """``lora_modules`` as (name, path, base model name or None: the first MODEL).

        Raises ``ConfigError`` for an entry that is neither ``NAME=PATH`` nor a JSON object with
        ``name`` and ``path`` (vLLM's two forms)."""
        out: list[tuple[str, str, str | None]] = []
        for item in self.lora_modules:
            text = item.strip()
            if text.startswith("{"):
                try:
                    spec = json.loads(text)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"lora_modules entry {item!r} is not valid JSON: {e}") from None
                if not isinstance(spec, dict) or not spec.get("name") or not spec.get("path"):
                    raise ConfigError(
                        f'lora_modules entry {item!r} needs "name" and "path" (and optionally '
                        '"base_model_name")'
                    )
                out.append((str(spec["name"]), str(spec["path"]), spec.get("base_model_name")))
                continue
            name, eq, path = text.partition("=")
            if not eq or not name.strip() or not path.strip():
                raise ConfigError(
                    f"lora_modules entry {item!r}: write NAME=PATH (e.g. sql=runs/sql/adapter) or "
                    '{"name": "sql", "path": "runs/sql/adapter", "base_model_name": "smollm2"}'
                )
            out.append((name.strip(), path.strip(), None))
        return out

    @staticmethod
    def env_api_keys() -> list[str]:
        """API keys from ``LAMINA_API_KEY`` (several separated by commas)."""
        return [k.strip() for k in os.environ.get("LAMINA_API_KEY", "").split(",") if k.strip()]
