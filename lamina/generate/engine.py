"""The engine: continuous batching of KV-cache decoding, one ``GenerationConfig`` per sequence.

``Engine`` keeps one running batch. ``submit`` queues a request (a prompt and its config); every
``step`` first admits queued requests (their prompts prefilled together, left-padded, each computing what
it would alone; a prompt longer than ``max_prefill_tokens`` in chunks over several steps; with a
``PrefixCache`` only what follows a prompt's longest cached prefix; their rows join the batch's KV cache),
then decodes one token for every running sequence.
Each sequence has its own sampler (controls and seeded random stream), its own stopping (eos,
``stop_token_ids``, stop strings on the decoded text, a finished JSON value, ``max_new_tokens``), and
leaves the batch the step it finishes, freeing its cache row for the next request. ``step`` returns the
new tokens with their text deltas (never splitting a UTF-8 character, holding back text that may
start a stop string) and, when asked for, their log-probabilities.

Two decoding modes share the batch with plain requests (``Running``, one row each):

- beam search (``num_beams`` > 1): the request is a beam group of ``num_beams`` rows (``_Beams`` over
  ``lamina.generate.beam.BeamGroup``), advanced every step with the others; its cache rows are reordered
  within the group as beams are picked, and its ``n`` best beams come out, with their text, the step the
  group is done;
- speculative decoding (``Engine(model, draft=..., num_draft_tokens=K)``): every greedy row gets up to K
  draft proposals per step (``lamina.generate.speculative.Drafter``) that the one target forward of the
  step verifies; rejected slots become invalid in the cache. ``draft_stats`` counts the acceptance.

An encoder-decoder (T5) takes the same requests: the prompt given is its source. At admission the source
runs once through the encoder (``_prefill``, the one place the two families differ); the decoder's prompt
is ``[decoder_start_token_id]`` (what penalties see as the prompt, as in ``transformers``), and the row's
cache keeps the cross-attention keys of the encoder output next to its self-attention keys (``KVCache``
pads them to the longest source of the batch and moves them with the rows).

``generate_ids`` runs a list of prompts to completion on an engine; the HTTP server drives ``step``
from its own loop and submits requests as they arrive.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lamina.config import GenerationConfig, ModelConfig
from lamina.errors import ConfigError
from lamina.generate.beam import BeamGroup, check_beam_config
from lamina.generate.prefix_cache import PrefixCache, place
from lamina.generate.sampling import Sampler, prompt_logprobs, sample_batch, token_logprobs
from lamina.generate.sequences import Delta, Running, Sequence_, TokenLogprob
from lamina.generate.speculative import Drafter, DraftStats, SpeculativeOptions, keep_slots
from lamina.malloc import trim
from lamina.model.layers import KVCache
from lamina.model.lora import MultiLoraLinear, adapter_names, multi_lora_layers, select_adapters
from lamina.model.quant import pads_across, path_lengths
from lamina.model.transformer import Transformer
from lamina.tokenizer import Tokenizer

if TYPE_CHECKING:  # constrain.py defines the protocol; the engine imports it only when a request needs it
    from lamina.generate.constrain import Constraint

GREEDY = GenerationConfig(temperature=0.0)


# weight formats whose decoding steps run exact shapes even with pad_shapes: their kernels gave a server
# growth of 1.03x its KV unpadded (RESULTS, 16:11) and a step of 9 rows padded to 16 costs int4 ~1.5x
UNPADDED_FORMATS = ("int8", "int4", "w8a8")


def batch_rows(n: int, most: int) -> int:
    """The rows a decoding step of ``n`` sequences runs, and that the batch's KV cache holds, with the
    engine's ``pad_shapes``: ``n`` rounded up to 1, 2, 4, 8, then a multiple of 8, but not past ``most``
    (the engine's ``max_batch_size``) unless ``n`` is. A matmul library keeps kernels and buffers per row
    count (oneDNN ~0.6 MiB per weight shape and row count for SmolLM2, kept in its primitive cache): a
    server decoding every batch size from 1 to 16 kept 16 sets; padded, 5. A decoding step reads every
    weight whatever its rows, so the padding rows cost little at these sizes (yet a padded fp32 step
    takes 1.09-1.31x on CPU, RESULTS: the engine pads only when asked). The real rows get the same tokens
    up to float rounding (the row count changes which matmul kernel runs)."""
    b = 1 << (n - 1).bit_length() if n <= 8 else -(-n // 8) * 8
    return max(n, min(b, most))


def prefill_tokens(n: int) -> int:
    """The tokens per row a prefill of prompts (rests after their cached prefixes) of at most ``n``
    tokens runs: 8, 16, 32, 64, then a multiple of 64 (left padding, masked; dropped from the cache after
    the forward), so that prefills make a bounded set of matmul row counts (``batch_rows``)."""
    return 8 if n <= 8 else 1 << (n - 1).bit_length() if n <= 64 else -(-n // 64) * 64


def max_source_tokens(config: ModelConfig) -> int | None:
    """The longest source an encoder-decoder's encoder reads: ``max_seq_len`` with learned or sinusoidal
    positions (a learned table ends there), None (no limit) with T5's relative position bias, whose
    buckets cover any distance (``transformers``' T5 encodes any length too; attention's memory grows with
    the square of the length). None for a decoder (its prompt shares the window with the output)."""
    if config.arch != "encoder-decoder" or config.pos_encoding == "relative":
        return None
    return config.max_seq_len


def source_token_cost(config: ModelConfig, dtype: torch.dtype) -> float:
    """What one source token of a row keeps in an encoder-decoder's decoding cache, in decoder tokens
    (one token: its keys and values in every decoder layer, the unit of ``Engine.max_tokens_in_flight``):
    1 for its cross-attention keys and values, plus with ``copy_attention`` the copy head's key and the
    encoder output (2 x ``d_model`` of ``dtype``) and its token id (int64) (``KVCache.memory_ids``).
    0 for a decoder."""
    if config.arch != "encoder-decoder":
        return 0.0
    layers, heads, head_dim = config.n_decoder_layers, config.n_kv_heads, config.head_dim
    assert layers is not None and heads is not None and head_dim is not None
    size = torch.empty((), dtype=dtype).element_size()
    token = 2 * layers * heads * head_dim * size  # bytes
    copy = (2 * config.d_model * size + 8) if config.copy_attention else 0
    return (token + copy) / token


def require_generative(config: ModelConfig, name: str | None = None) -> None:
    """Raise ``ConfigError`` unless a model of this ``config`` can generate text: a decoder or an
    encoder-decoder with an lm head.

    The message says which verb runs the model instead: ``lamina embed`` / ``lamina fill-mask`` for an
    encoder, its task head for a classifier or regressor. ``name`` (the model's) goes in the message.
    """
    if config.arch in ("decoder", "encoder-decoder") and config.head == "lm":
        return
    what = f"model {name!r}" if name else "this model"
    if config.arch == "encoder":
        use = (
            "`lamina fill-mask` predicts masked tokens, `lamina embed` gives sentence vectors"
            if config.head == "lm"
            else "`lamina embed` gives its sentence vectors"
            if config.head == "none"
            else f"run its {config.head!r} head on a text with lm.model(ids)"
        )
        raise ConfigError(
            f"{what} is an encoder (arch='encoder', head={config.head!r}): it reads text in both directions "
            f"and cannot generate; {use}"
        )
    use = (
        "`lamina embed` gives its hidden states as sentence vectors"
        if config.head == "none"
        else f"run its {config.head!r} head on a text with lm.model(ids) (labels: {config.labels or 'unnamed'})"
    )
    raise ConfigError(
        f"{what} has head={config.head!r}, not a language-model head (head='lm'): it cannot generate text; {use}"
    )


class _Beams:
    """Engine-side state of a beam-search request: its group (``num_beams`` rows) and its n sequences."""

    def __init__(self, group: BeamGroup, seqs: list[Sequence_], tokenizer: Tokenizer | None) -> None:
        self.group, self.seqs, self.tokenizer = group, seqs, tokenizer
        self.rows = group.rows

    def finish(self) -> list[Delta]:
        """The group is done: its n best beams become the sequences, each one finishing delta with its
        whole text (decoded after the prompt, as the engine decodes a stream)."""
        out = []
        for seq, beam in zip(self.seqs, self.group.best(), strict=True):
            seq.tokens, seq.finish_reason, seq.score = beam.tokens, beam.finish_reason, beam.score
            if self.tokenizer is not None:
                decoder = self.tokenizer.decode_stream(skip_special_tokens=True, prompt_ids=self.group.prompt)
                seq.text = "".join(decoder.step(t) for t in seq.tokens) + decoder.finish()
            out.append(Delta(seq, None, seq.text or ""))
        return out

    def fail(self, reason: str, error: str | None = None) -> list[Delta]:
        """The group stops without a result (``reason`` "abort" or "error")."""
        for seq in self.seqs:
            seq.finish_reason, seq.error = reason, error
            if self.tokenizer is not None:
                seq.text = ""
        return [Delta(seq, None, "") for seq in self.seqs]


_Unit = Running | _Beams  # what occupies rows of the batch: one row, or a beam group's num_beams rows


@dataclass
class _Partial:
    """A prompt longer than a step's prefill budget, prefilled chunk by chunk over several steps."""

    req: _Request
    cache: KVCache  # one row; slots [0, done) hold the prompt's first ``done`` tokens
    done: int
    salt: int  # its LoRA adapter
    cached: int  # tokens loaded from the prefix cache (the blocks before are stored already)


@dataclass
class _Request:
    request_id: int
    prompt: list[int]  # the decoder's prompt (an encoder-decoder's: [decoder_start_token_id])
    cfg: GenerationConfig
    seqs: list[Sequence_]
    running: list[Running]
    beams: _Beams | None = None
    source: list[int] | None = None  # an encoder-decoder's source (what was submitted as the prompt)

    @property
    def prefill_tokens(self) -> int:
        """Tokens the admission runs through the model."""
        return len(self.prompt) + len(self.source or ())

    @property
    def rows(self) -> int:
        """Rows of the batch the request occupies."""
        return self.beams.rows if self.beams is not None else len(self.running)


class Engine:
    """A running batch of sequences that requests join and leave between decode steps.

    ``max_batch_size`` bounds the running rows (a sequence is one row, a beam-search request
    ``num_beams``), ``max_tokens_in_flight`` (optional) the sum of prompt + budget tokens over them
    (an encoder-decoder's rows also count their source's cached tokens, ``source_token_cost``);
    requests beyond wait in the queue (first come, first served). ``max_prefill_tokens`` bounds the
    prompt tokens prefilled in one step (at least one request is admitted), so a burst of arrivals does
    not stall the running sequences for long. ``draft`` (a ``Transformer`` with the model's vocabulary,
    e.g. ``speculative.layer_skip_draft(model, K)``) makes greedy rows speculative, with
    ``num_draft_tokens`` proposals per step. ``submit`` and ``cancel`` may be called from other threads
    while one thread calls ``step``. An encoder-decoder's requests give their source as the prompt (see
    the module docstring). ``prefix_cache_mib`` > 0 keeps the keys and values of prompt prefixes across
    requests, up to that many MiB (``lamina.generate.prefix_cache``; a decoder's requests then prefill
    only what follows their longest cached prefix; the output does not change); 0: off. A model with
    dynamic RoPE (``rope_scaling="dynamic"``, which scales a forward's frequencies by its longest
    position, so a key depends on the whole prompt that computed it) gets neither prefix caching nor
    chunked prefill: its prompts are prefilled whole. Equality with one request at a time holds up to
    float rounding: ~1e-7 in fp32; with bf16 activations (bf16, int8, int4 weights) a prompt left-padded
    to the longest of its group can move by bf16's rounding (logprobs up to ~7e-3 apart on tiny models).
    The int8/int4 layers choose their kernel by the tokens per sequence of a forward, never by the batch
    size (``lamina.model.quant``; groups never pad across a switch), so batch-mates do not change which
    kernel a row gets. ``max_prefill_tokens`` counts the tokens a prompt runs through
    the model (not its cached prefix). ``pad_shapes`` runs decoding steps of ``batch_rows`` rows and
    prefills of ``prefill_tokens`` tokens per row (padding; the same tokens up to float rounding: the
    row count changes which matmul kernel runs), a bounded set of matmul shapes (the memory a matmul
    library keeps per shape stays bounded: ``lamina serve`` turns it on, ``ServeConfig.pad_shapes``);
    False (offline generation, where it buys nothing), and for the integer weight formats
    (``UNPADDED_FORMATS``): the exact shapes.
    Raises ``ConfigError`` for a model (or draft) that cannot generate, a negative
    ``prefix_cache_mib``, and for a draft with an encoder-decoder.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer | None = None,
        eos_token_ids: Sequence[int] = (),
        max_batch_size: int = 32,
        max_tokens_in_flight: int | None = None,
        max_prefill_tokens: int = 1024,
        draft: Transformer | None = None,
        num_draft_tokens: int = SpeculativeOptions.num_draft_tokens,
        prefix_cache_mib: float = 0.0,
        pad_shapes: bool = False,
    ) -> None:
        require_generative(model.config)
        if max_batch_size < 1:
            raise ConfigError(f"max_batch_size={max_batch_size} must be >= 1")
        self.model, self.tokenizer = model, tokenizer
        self.eos_token_ids = list(eos_token_ids)
        self.max_batch_size, self.max_tokens_in_flight = max_batch_size, max_tokens_in_flight
        self.max_prefill_tokens = max_prefill_tokens
        self.pad_shapes = pad_shapes and model.weight_format not in UNPADDED_FORMATS
        self._drafter: Drafter | None = None
        self._enc_dec = model.config.arch == "encoder-decoder"
        if draft is not None and self._enc_dec:
            raise ConfigError("speculative decoding (a draft) is for decoder models, not an encoder-decoder")
        if draft is not None:
            require_generative(draft.config, "draft")
            if draft.config.vocab_size != model.config.vocab_size:
                raise ConfigError(
                    f"draft vocab_size={draft.config.vocab_size} differs from the model's "
                    f"{model.config.vocab_size}: the draft must use the model's tokenizer"
                )
            self._drafter = Drafter(draft, num_draft_tokens)
        self._queue: deque[_Request] = deque()
        self._partial: _Partial | None = None  # a long prompt being prefilled in chunks (it left the queue)
        self._cancelled: set[int] = set()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._running: list[_Unit] = []  # per cache row, in row order (a beam group on each of its rows)
        self._owner: dict[int, int] = {}  # id(Sequence_) -> request id, for cancellation
        self._cache: KVCache | None = None
        self._step_rows = 0  # the most rows the batch can have once this step's admissions join
        self._view: KVCache | None = None  # a prefill's rows in the batch's storage, until _settle
        self._view_rows: list[int] = []  # the storage rows of the view that joined, in order
        self._compact = False  # _settle drops leading slots empty in every row (the prefill's padding)
        self._decode_rows = 0  # the rows of the last one-token decoding step (0: none since emptied)
        self._rid_adapter: dict[int, int] = {}  # request id -> its LoRA adapter, when not 0 (the base)
        self._lora_layers: list[MultiLoraLinear] | None = None  # found at the first adapter request
        p = model.tok_emb.weight
        self._device, self._dtype = p.device, p.dtype
        self._source_cost = source_token_cost(model.config, self._dtype)  # decoder tokens per source token
        if prefix_cache_mib < 0:
            raise ConfigError(f"prefix_cache_mib={prefix_cache_mib} must be >= 0 (0: no prefix caching)")
        # dynamic RoPE scales a forward by its longest position: the keys of a cached block or of a chunk
        # would depend on the prompt or chunk that computed them (logprobs off by ~1e-3): whole prompts only
        self._whole_prompts = model.config.rope_scaling == "dynamic"
        self._path_lengths = path_lengths(model)  # prompts padded across these get other int8/int4 numerics
        self.prefix_cache: PrefixCache | None = None
        if prefix_cache_mib > 0 and not self._enc_dec and not self._whole_prompts:
            budget = int(prefix_cache_mib * 2**20)
            self.prefix_cache = PrefixCache(model.config, budget, dtype=self._dtype, device=self._device)

    @property
    def draft_stats(self) -> DraftStats | None:
        """Draft tokens proposed and accepted so far (None without a draft)."""
        d = self._drafter
        return None if d is None else DraftStats(d.proposed, d.accepted)

    # -- requests ----------------------------------------------------------------------------------------
    def submit(
        self, prompt_ids: Sequence[int], config: GenerationConfig = GREEDY, adapter: int = 0
    ) -> list[Sequence_]:
        """Queue a request; returns its ``config.n`` sequences (filled in as ``step`` runs).

        ``config.num_beams`` > 1 makes it a beam search (its sequences are the n best beams, known when
        the search ends). An encoder-decoder's ``prompt_ids`` are its source. Raises ``ConfigError`` at
        once for an empty prompt, one that does not fit the context window (a source: longer than it),
        token ids outside the vocabulary (in the prompt or in ``config``: ``check_token_ids``), stop
        strings / constraints without a tokenizer, what beam search cannot do (``check_beam_config``), and
        ``prompt_logprobs`` on an encoder-decoder.

        ``adapter`` k > 0 runs the request through the model's k-th LoRA adapter
        (``lamina.model.lora.add_multi_adapter``; 0: the base), in the same batch as the others: its rows
        select their adapter in every forward (``select_adapters``). An unknown k raises ``ConfigError``.
        """
        rid = next(self._ids)
        if adapter:
            if not 0 < adapter <= len(adapter_names(self.model)):
                n = len(adapter_names(self.model))
                raise ConfigError(f"adapter={adapter}: the model has {n} LoRA adapter(s) (0 is the base)")
            if self._drafter is not None and multi_lora_layers(self._drafter.model):
                raise ConfigError("a draft that shares the model's LoRA layers cannot run adapter requests")
            self._rid_adapter[rid] = adapter
        return self._submit(prompt_ids, config, rid)[1]

    def _submit(
        self,
        prompt_ids: Sequence[int],
        cfg: GenerationConfig,
        rid: int,
        prompt_index: int | None = None,
        beam: bool | None = None,
    ) -> tuple[int, list[Sequence_]]:
        prompt = [int(t) for t in prompt_ids]
        limit, vocab = self.model.config.max_seq_len, self.model.config.vocab_size
        if not prompt:
            raise ConfigError("every prompt needs at least one token (empty prompt given)")
        source_limit = max_source_tokens(self.model.config)
        if not self._enc_dec and len(prompt) >= limit:
            raise ConfigError(
                f"prompt of {len(prompt)} tokens does not fit the context window max_seq_len={limit}"
            )
        if source_limit is not None and len(prompt) > source_limit:
            raise ConfigError(
                f"source of {len(prompt)} tokens does not fit the encoder's context window "
                f"max_seq_len={limit} ({self.model.config.pos_encoding} positions); shorten the source"
            )
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ConfigError(f"prompt token ids must be in [0, {vocab}) (vocab_size of the model)")
        cfg.check_token_ids(vocab)
        source = None
        if self._enc_dec:  # the source goes to the encoder; the decoder starts from its start token
            if cfg.prompt_logprobs is not None:
                raise ConfigError(
                    "prompt_logprobs score a prompt the model continues; an encoder-decoder reads its "
                    "source and does not predict it: leave prompt_logprobs unset"
                )
            source, prompt = prompt, [self.model.config.decoder_start_token_id]
        beam = cfg.num_beams > 1 if beam is None else beam
        if beam:
            check_beam_config(cfg)
        if (cfg.stop or cfg.constrained) and self.tokenizer is None:
            raise ConfigError(
                "stop strings and constrained output work on text: give the engine the tokenizer"
            )
        idx = rid if prompt_index is None else prompt_index
        seqs = [Sequence_(idx, index=k, prompt_tokens=len(source or prompt)) for k in range(cfg.n)]
        budget = min(cfg.max_new_tokens, limit - len(prompt))
        running: list[Running] = []
        beams = None
        if beam:
            group = BeamGroup(cfg, prompt, self.eos_token_ids, budget, self._device)
            beams = _Beams(group, seqs, self.tokenizer)
        else:
            # samplers and constraints are built now, so that their errors reach the caller, not step()
            stops = set(cfg.stop_token_ids) | (set() if cfg.ignore_eos else set(self.eos_token_ids))
            running = [
                Running(s, Sampler(cfg, prompt, index=s.index, tokenizer=self.tokenizer), budget, stops,
                         self.tokenizer, prompt, self._constraint(cfg))
                for s in seqs
            ]  # fmt: skip
            d = self._drafter
            for r in running:  # greedy rows without logprobs are speculative (within the draft's window)
                r.spec = (
                    d is not None and r.plain and not (cfg.logprobs or cfg.top_logprobs)
                    and len(prompt) + budget <= d.model.config.max_seq_len
                )  # fmt: skip
        with self._lock:
            self._queue.append(_Request(rid, prompt, cfg, seqs, running, beams, source))
            for s in seqs:
                self._owner[id(s)] = rid
        return rid, seqs

    def cancel(self, seqs: Sequence[Sequence_]) -> None:
        """Stop the request these sequences belong to (e.g. its client went away) at the next step."""
        with self._lock:
            self._cancelled.update(self._owner[id(s)] for s in seqs if id(s) in self._owner)

    @property
    def num_running(self) -> int:
        """Rows in the running batch (sequences, and num_beams per beam search)."""
        return len(self._running)

    @property
    def cache_bytes(self) -> int:
        """Bytes of keys and values the running batch's KV cache storage holds (its rows, spare rows and
        slots included; an encoder-decoder's cross-attention keys not); 0 without a batch."""
        cache = self._cache  # its k and v are views of the first rows of each layer's storage
        return 0 if cache is None else sum(t.untyped_storage().nbytes() for t in (*cache.k, *cache.v))

    @property
    def num_queued(self) -> int:
        """Requests waiting to be admitted."""
        return len(self._queue) + (self._partial is not None)

    def has_work(self) -> bool:
        """Whether a ``step`` would do anything."""
        return bool(self._running or self._queue or self._partial)

    # -- the loop ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, decode: bool = True, emit: Callable[[list[Delta]], None] | None = None) -> list[Delta]:
        """Admit what fits from the queue, then decode one token for every running sequence (up to
        ``num_draft_tokens`` + 1 for a speculative one; one step of every beam search).

        ``decode=False`` only admits (prefills the prompts and picks their first tokens): a caller timing
        the prefill apart from decoding, as ``lamina.generate.text.complete`` does, steps once so.
        ``emit``, when given, receives the admission's deltas (the new requests' first tokens) before the
        decoding forward runs (and before the memory the prefill freed is returned, ``trim``), instead of
        with the returned ones, so that a server streams a first token one decoding step sooner (its time
        to first token); the returned list then holds the rest.
        """
        out: list[Delta] = []
        ran = bool(self._running)
        self._apply_cancellations(out)
        budget = self.max_prefill_tokens
        self._step_rows = len(self._running) + (self._partial.req.rows if self._partial is not None else 0)
        prefilled = self._partial is not None
        if prefilled:  # the next chunk of a long prompt first; the queue waits behind it
            budget -= self._continue_partial(budget, out)
        taken = self._admissible(budget) if self._partial is None and budget > 0 else []
        self._step_rows += sum(r.rows for r in taken)
        together = [r for r in taken if self._batched_prefill(r)]
        if together:
            out += self._admit_together(together, budget)
        batched = {id(r) for r in together}
        for req in taken:
            if id(req) not in batched:
                with self._adapters([self._rid_adapter.get(req.request_id, 0)]):
                    out += self._admit(req)
            if all(s.finish_reason is not None for s in req.seqs):  # done at admission
                self._rid_adapter.pop(req.request_id, None)
        if emit is not None and out:
            emit(out)
            out = []
        # a prefill's activations were freed: their pages go back (``trim``, ``release`` policy only);
        # MKL's buffers stay while rows run (the next decoding step's; ``_decode`` frees them when its
        # row count changes) and go with the batch
        admitted = bool(taken or prefilled)
        if admitted and self._running:
            trim(mkl=False)
        if decode and self._running:
            with self._adapters(self._row_adapters()):
                out += self._decode()
        if not self._running and (admitted or ran):
            self._decode_rows = 0
            trim()
        return out

    def _row_adapters(self) -> list[int]:
        """The LoRA adapter of each running row (0: the base), in row order."""
        if not self._rid_adapter:
            return []
        owner, of = self._owner, self._rid_adapter
        seqs = [u.seqs[0] if isinstance(u, _Beams) else u.seq for u in self._running]
        return [of.get(owner.get(id(s), -1), 0) for s in seqs]

    def _adapters(self, rows: list[int]) -> contextlib.AbstractContextManager[None]:
        """Rows select their adapters in the forwards inside (nothing to do when all use the base)."""
        if not any(rows):
            return contextlib.nullcontext()
        if self._lora_layers is None:
            self._lora_layers = multi_lora_layers(self.model)
        return select_adapters(self._lora_layers, rows)

    def _units(self) -> list[tuple[int, _Unit]]:
        """(first row, unit) of every unit of the batch, in row order."""
        units, i = [], 0
        while i < len(self._running):
            u = self._running[i]
            units.append((i, u))
            i += u.rows if isinstance(u, _Beams) else 1
        return units

    def _apply_cancellations(self, out: list[Delta]) -> None:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            part = self._partial
            if part is not None and part.req.request_id in cancelled:
                self._partial = None
                self._queue.appendleft(part.req)  # leaves with the queued ones below
            if cancelled:
                for req in [r for r in self._queue if r.request_id in cancelled]:
                    self._queue.remove(req)
                    self._rid_adapter.pop(req.request_id, None)
                    for s in req.seqs:
                        s.finish_reason = "abort"
                        self._owner.pop(id(s), None)
                        out.append(Delta(s, None, ""))
        if not cancelled:
            return
        keep: list[int] = []
        for row, u in self._units():
            seq = u.seqs[0] if isinstance(u, _Beams) else u.seq
            if self._owner.get(id(seq)) not in cancelled:
                keep += range(row, row + u.rows) if isinstance(u, _Beams) else [row]
            elif isinstance(u, _Beams):
                out += u.fail("abort")
            else:
                u.seq.finish_reason = "abort"
                out.append(Delta(u.seq, None, u._flush()))
        self._retire(keep)

    def _admissible(self, budget: int) -> list[_Request]:
        taken: list[_Request] = []
        rows, prefill = len(self._running), 0
        tokens = sum(
            len(u.group.prompt if isinstance(u, _Beams) else u.sampler.prompt_ids)
            + (u.group.budget if isinstance(u, _Beams) else u.budget)
            for u in self._running
        )
        if self._cache is not None and self._cache.cross_k:  # each row also holds its (padded) source's K/V
            S = int(self._cache.cross_k[0].shape[2])  # (and, with copy_attention, copy keys and ids)
            tokens += math.ceil(len(self._running) * S * self._source_cost)
        with self._lock:
            while self._queue:
                req = self._queue[0]
                cost = req.prefill_tokens - self._cached_length(req)  # its cached prefix is not run
                if taken and prefill + cost > budget:
                    break
                need = (
                    len(req.prompt)
                    + math.ceil(len(req.source or ()) * self._source_cost)
                    + min(req.cfg.max_new_tokens, self.model.config.max_seq_len)
                )
                if rows and rows + req.rows > self.max_batch_size:
                    break
                if (
                    rows
                    and self.max_tokens_in_flight
                    and tokens + req.rows * need > self.max_tokens_in_flight
                ):
                    break
                taken.append(self._queue.popleft())
                rows, tokens = rows + req.rows, tokens + req.rows * need
                prefill += cost
        return taken

    def _cached_length(self, req: _Request) -> int:
        """Prompt tokens of ``req`` its admission would load from the prefix cache now (read-only)."""
        pc = self.prefix_cache
        if pc is None or req.source is not None or req.cfg.prompt_logprobs is not None:
            return 0  # an encoder-decoder's, or a prompt whose logprobs are wanted, runs whole
        return pc.cached_length(req.prompt, self._rid_adapter.get(req.request_id, 0))

    def _join(self, prefilled: KVCache, rows: int, capacity: int, row: int = 0) -> None:
        """Add ``rows`` copies of a prefilled request's cache row ``row`` to the batch's cache. Its storage
        is made (or grown) once for the rows this step's admissions can bring (with ``pad_shapes``
        rounded up as decoding steps pad them, ``batch_rows``), instead of growing as each request joins."""
        if self._view is not None:  # rows of a prefill into the batch's storage
            assert prefilled is self._view and self._cache is not None
            self._view_rows += [self._cache.rows + row] * rows  # storage rows (the batch's rows: before)
            return
        n, room = self._room(rows)
        batch = self._batch_storage(capacity, room)
        if n + rows > batch.max_batch_size:
            batch.reserve_rows(room)
        batch.add_rows(prefilled, [row] * rows)

    def _admit(self, req: _Request) -> list[Delta]:
        """Prefill one request alone, choose each sequence's first token, and add its rows to the batch."""
        if req.beams is not None:
            return self._admit_beams(req)
        cfg, prompt, running = req.cfg, req.prompt, req.running
        budget = running[0].budget
        out: list[Delta] = []
        want_prompt = cfg.prompt_logprobs is not None
        if budget <= 0 and not want_prompt:
            for r in running:
                r.seq.finish_reason = "length"
                out.append(Delta(r.seq, None, r._flush()))
            return out
        cache, logits = self._prefill(
            prompt, req.source, not want_prompt, self._rid_adapter.get(req.request_id, 0)
        )
        if cfg.prompt_logprobs is not None:
            pl = prompt_logprobs(logits[0], torch.tensor(prompt, device=self._device), cfg.prompt_logprobs)
            listed: list[TokenLogprob | None] = [None, *_to_list(pl, prompt[1:])]
            for r in running:
                r.seq.prompt_logprobs = listed
        if budget <= 0:  # only the prompt's logprobs were asked for (max_tokens=0, as lm-eval does)
            for r in running:
                r.seq.finish_reason = "length"
                out.append(Delta(r.seq, None, r._flush()))
            return out
        return self._start(req, logits[:, -1], cache, 0)

    def _batched_prefill(self, req: _Request) -> bool:
        """Whether the request's prompt is prefilled with the other plain ones of its step
        (``_admit_together``): a sampled or greedy request that decodes at least one token and wants no
        prompt logprobs (an encoder-decoder's: its source encoded with the others', ``_admit_sources``)."""
        return (
            req.beams is None
            and req.cfg.prompt_logprobs is None
            and bool(req.running)
            and req.running[0].budget > 0
        )

    def _admit_together(self, reqs: list[_Request], budget: int) -> list[Delta]:
        """Prefill the prompts of ``reqs`` together (groups of similar lengths, one forward each: fewer,
        larger matmuls than one forward per prompt), choose each sequence's first token, and add their
        rows to the batch. Each row's output is the one its prompt gets alone (up to float rounding).

        A lone request whose prompt (after its cached prefix) is longer than ``budget`` tokens is
        prefilled in chunks of at most ``max_prefill_tokens``, one per step (``_Partial``), so that the
        running sequences keep getting a token every step (not under dynamic RoPE: see ``Engine``)."""
        salts = [self._rid_adapter.get(r.request_id, 0) for r in reqs]
        if self._enc_dec:
            return self._admit_sources(reqs, salts)
        pc = self.prefix_cache
        found = [
            pc.lookup(r.prompt, s) if pc is not None else (0, None) for r, s in zip(reqs, salts, strict=True)
        ]
        out: list[Delta] = []
        if len(reqs) == 1 and not self._whole_prompts and len(reqs[0].prompt) - found[0][0] > budget:
            (req,), ((hit, kv),) = reqs, found
            cache = KVCache(self.model.config, 1, len(req.prompt), self._dtype, self._device)
            if kv is not None:
                place(kv, cache, 0, 0)
                cache.next_pos = torch.full_like(cache.next_pos, hit)
                cache.length = hit
            self._partial = _Partial(req, cache, hit, salts[0], hit)
            self._continue_partial(budget, out)
            return out
        rests = [len(r.prompt) - h for r, (h, _) in zip(reqs, found, strict=True)]
        groups = [p for g in _length_groups(rests, self._path_lengths) for p in self._pieces(g, any(salts))]
        for group in groups:
            budget_of = max(reqs[i].running[0].budget for i in group)
            try:  # a prefill that fails (an error, Ctrl-C) leaves no view pending: none of its rows join
                with self._adapters([salts[i] for i in group]):
                    cache, logits = self._prefill_rows(
                        [reqs[i].prompt for i in group], [salts[i] for i in group],
                        [found[i] for i in group], into_batch=budget_of,
                    )  # fmt: skip
                for row, i in enumerate(group):
                    out += self._start(reqs[i], logits[row : row + 1, -1], cache, row)
            finally:
                self._settle()
        return out

    def _admit_sources(self, reqs: list[_Request], salts: list[int]) -> list[Delta]:
        """Plain encoder-decoder requests: their sources encoded together (right-padded, in groups of
        similar lengths as ``_length_groups`` makes them: one encoder and one decoder forward per group,
        not one per request), each sequence's first token chosen, their rows added to the batch. Each
        row computes what it would alone (padding is masked; up to float rounding)."""
        out: list[Delta] = []
        dev = self._device
        for group in _length_groups([len(r.source or ()) for r in reqs], self._path_lengths):
            srcs = [reqs[i].source or [] for i in group]
            G, S = len(group), max(len(s) for s in srcs)
            ids = torch.zeros(G, S, dtype=torch.long)
            real = torch.zeros(G, S, dtype=torch.bool)
            for row, src in enumerate(srcs):
                ids[row, : len(src)] = torch.tensor(src)
                real[row, : len(src)] = True
            ids, real = ids.to(dev), real.to(dev)
            starts = torch.tensor([reqs[i].prompt for i in group], device=dev)  # (G, 1): the start token
            cache = KVCache(self.model.config, G, starts.shape[1], self._dtype, dev)
            with self._adapters([salts[i] for i in group]):
                memory = self.model.encode(ids, real)  # (G, S, d_model)
                logits = self.model.decode(starts, memory, real, cache=cache, last_only=True, source_ids=ids)
            for row, i in enumerate(group):
                out += self._start(reqs[i], logits[row : row + 1, -1], cache, row)
        return out

    def _continue_partial(self, budget: int, out: list[Delta]) -> int:
        """Prefill the next chunk (at most ``budget`` tokens, at least one) of the partial prompt; when it
        is whole, its sequences start (their deltas go to ``out``). Returns the tokens prefilled."""
        part = self._partial
        assert part is not None
        prompt = part.req.prompt
        n = min(max(budget, 1), len(prompt) - part.done)
        ids = torch.tensor([prompt[part.done : part.done + n]], device=self._device)
        with self._adapters([part.salt]):
            logits = self.model(ids, cache=part.cache, last_only=True)
        part.done += n
        if part.done == len(prompt):
            self._partial = None
            if self.prefix_cache is not None:
                self.prefix_cache.store(prompt, part.cache, part.salt, start=part.cached)
            out += self._start(part.req, logits[:, -1], part.cache, 0)
            if all(s.finish_reason is not None for s in part.req.seqs):  # done at its first token
                self._rid_adapter.pop(part.req.request_id, None)
        return n

    def _start(self, req: _Request, last: Tensor, cache: KVCache, row: int) -> list[Delta]:
        """A prefilled plain request: choose its sequences' first tokens from ``last`` (1, V), the logits
        after its prompt, and add the rows still going to the batch (copies of ``cache``'s row ``row``)."""
        running, budget = req.running, req.running[0].budget
        out, joined = [], []
        logits = last.float().expand(len(running), -1)
        for r, tok, lp in zip(running, *self._choose_safely(logits, running), strict=True):
            if tok < 0:
                out.append(Delta(r.seq, None, r._flush()))
                continue
            out.append(r.delta(tok, lp))
            if r.seq.finish_reason is None:
                r.feed = tok
                joined.append(r)
        if joined:
            self._join(cache, len(joined), len(req.prompt) + budget, row)
            self._running += joined
            spec = [r.feed for r in joined if r.spec]
            if spec:
                assert self._drafter is not None
                self._drafter.admit(req.prompt, spec)
        return out

    def _prefill_rows(
        self,
        prompts: list[list[int]],
        salts: list[int],
        found: list[tuple[int, Tensor | None]],
        into_batch: int | None = None,
    ) -> tuple[KVCache, Tensor]:
        """Prefill decoder ``prompts`` in one forward: (cache, one row each, logits (B, 1, V) of each
        prompt's last token).

        ``found[i]`` is prompt i's cached prefix (``PrefixCache.lookup``: its length and keys, loaded
        instead of computed); the rest of each prompt is left-padded to the longest rest. Row i's slots:
        its cached prefix just before slot P0 (the longest prefix), padding, then its rest ending at the
        last slot; positions count real tokens only, so every row computes what it would alone. The
        rows' new whole blocks go to the prefix cache (``salts[i]``: the row's LoRA adapter).

        With ``pad_shapes`` the forward runs ``prefill_tokens`` tokens per row (more left padding, unless
        that would cross an int8/int4 path length) and ``batch_rows`` rows (copies of row 0, without
        adapters), so a server's prefills make a bounded set of matmul shapes; the padding slots left
        empty in every row leave the cache after the forward (``KVCache.compact``).

        ``into_batch`` (tokens: the longest output budget of the rows): the forward writes straight into
        spare rows of the batch's KV storage (``KVCache.rows_view``; made or grown first), aligned to end
        where the batch's rows end, so no one-off cache is made and copied (its memory was alive beside
        the batch's at the peak); the rows that ``_start`` keeps join at ``_settle``. Without room for
        the padded rows in the storage the rows get their own cache as before. A view's ``length`` is
        the batch's (> 0 once rows ran), so one-token prompts prefilled into it take the model's
        decoding-step path (a compiled step when attached) where an own cache's are eager: the same
        result up to float rounding. A failed forward leaves the view to ``_settle``, which joins none
        of its rows."""
        B, P0 = len(prompts), max(h for h, _ in found)
        rests = [len(p) - h for p, (h, _) in zip(prompts, found, strict=True)]
        T = max(rests)
        if self.pad_shapes:
            padded = prefill_tokens(T)
            T = T if pads_across(min(rests), padded, self._path_lengths) else padded
            if not any(salts):
                copies = batch_rows(B, self.max_batch_size) - B
                prompts, found = prompts + [prompts[0]] * copies, found + [found[0]] * copies
        view = (
            self._batch_view(len(prompts), P0 + T, max(len(p) for p in prompts) + into_batch, B)
            if into_batch is not None
            else None
        )
        if view is None:
            cache = KVCache(self.model.config, len(prompts), P0 + T, self._dtype, self._device)
        else:
            cache, P0 = view, view.length - T  # the prompts end where the batch's rows end
            cache.valid[:, :P0] = False  # the spare rows' old slots before the prompts: masked
            cache.positions[:, :P0] = 0
        ids = torch.zeros(len(prompts), T, dtype=torch.long)
        real = torch.zeros(len(prompts), T, dtype=torch.bool)
        for i, (p, (h, kv)) in enumerate(zip(prompts, found, strict=True)):
            if kv is not None:
                place(kv, cache, i, P0 - h)
            ids[i, T - (len(p) - h) :] = torch.tensor(p[h:])
            real[i, T - (len(p) - h) :] = True
        cache.next_pos = torch.tensor([h for h, _ in found], device=self._device)
        cache.length = P0
        mask = None if bool(real.all()) else real.to(self._device)
        logits = self.model(ids.to(self._device), attention_mask=mask, cache=cache, last_only=True)
        pc = self.prefix_cache
        if pc is not None:
            for i, (p, s, (h, _)) in enumerate(zip(prompts[:B], salts, found[:B], strict=True)):
                pc.store(p, cache, s, row=i, offset=P0 + T - len(p), start=h)
        if view is not None:
            self._compact = T > max(rests)  # after the rows join (_settle): slots empty in every row
        elif T > max(rests):
            cache.compact()
        return cache, logits[:B]

    def _room(self, rows: int) -> tuple[int, int]:
        """(rows running, rows the batch's storage is made or grown to) when ``rows`` more join now."""
        n = len(self._running) if self._cache is not None else 0
        room = max(n + rows, self._step_rows)
        return n, batch_rows(room, self.max_batch_size) if self.pad_shapes else room

    def _pieces(self, group: list[int], adapters: bool) -> list[list[int]]:
        """``group`` (a prefill group) as it is prefilled: whole, or, when its padded rows
        (``batch_rows``) do not fit the batch's storage beside the running rows, in pieces of 8, 4, 2, 1
        rows (each a padded size), so that every piece prefills into the storage (``_batch_view``)."""
        if not self.pad_shapes or adapters or self._enc_dec:
            return [group]
        n, room = self._room(len(group))
        if n + batch_rows(len(group), self.max_batch_size) <= room:
            return [group]
        pieces, rest = [], group
        while rest:
            k = min(8, 1 << (len(rest).bit_length() - 1))
            pieces.append(rest[:k])
            rest = rest[k:]
        return pieces

    def _batch_view(self, rows: int, slots: int, capacity: int, real: int) -> KVCache | None:
        """A view (``KVCache.rows_view``) of ``rows`` spare rows of the batch's KV storage (``real`` of
        them requests', the others padding) for a prefill of ``slots`` slots per row, its ``length`` where
        the batch's rows end (the prefill's tokens end there too). The storage is made, or grown in rows
        and slots, first: rows as ``_join`` grows them; when made, ``capacity`` slots (the longest prompt
        and output budget; the prefill's padding slots leave at ``_settle``). None (the prefill gets its
        own cache) when the rows do not fit the rows this step's batch can have, for an encoder-decoder,
        and while a view is pending."""
        if self._enc_dec or self._view is not None:
            return None
        n, room = self._room(real)
        if n + rows > room:
            return None
        batch = self._batch_storage(max(slots, capacity), room)
        batch.reserve_rows(room)
        if slots > batch.length:  # the running rows get masked, empty slots up to the prefill's end
            if slots > batch.capacity:
                batch.compact()
            if slots > batch.capacity:
                batch.reserve(slots - batch.length)
            if slots > batch.length:
                batch.valid[:, batch.length : slots] = False
                batch.length = slots
        self._view, self._view_rows, self._compact = batch.rows_view(n, rows), [], False
        return self._view

    def _batch_storage(self, capacity: int, room: int) -> KVCache:
        """The batch's KV cache; with no running rows a new one (no rows yet, storage for ``room`` rows
        of ``capacity`` slots), the emptied batch's storage freed before it is made."""
        if self._cache is None or not self._running:
            self._cache = None  # the old storage goes first: two at once were the server's RSS peak
            self._cache = KVCache(
                self.model.config, 0, capacity, self._dtype, self._device, max_batch_size=room
            )
        return self._cache

    def _settle(self) -> None:
        """The rows of a prefill into the batch's storage (``_batch_view``) that ``_start`` kept join the
        batch (their storage rows, in order); the others' rows stay spare."""
        view, self._view = self._view, None
        if view is None:
            return
        assert self._cache is not None
        self._cache.settle_rows(self._view_rows)
        if not self._cache.rows:
            self._cache = None  # nothing joined and nothing runs: no storage kept
        elif self._compact:
            self._cache.compact()

    def _prefill(
        self, prompt: list[int], source: list[int] | None, last_only: bool, salt: int = 0
    ) -> tuple[KVCache, Tensor]:
        """Run one request's prompt into a fresh one-row cache: (cache, logits (1, T or 1, V)).

        A decoder's prompt with ``last_only`` goes through ``_prefill_rows`` (its cached prefix loaded,
        its blocks stored; ``salt``: its LoRA adapter). An encoder-decoder first encodes its ``source``
        (once); the decoder reads that memory through cross-attention, whose keys and values the cache
        keeps for every later step of the row."""
        if source is None and last_only:
            pc = self.prefix_cache
            return self._prefill_rows(
                [prompt], [salt], [pc.lookup(prompt, salt) if pc is not None else (0, None)]
            )
        cache = KVCache(self.model.config, 1, len(prompt), self._dtype, self._device)
        ids = torch.tensor([prompt], device=self._device)
        if source is None:
            return cache, self.model(ids, cache=cache, last_only=last_only)
        src = torch.tensor([source], device=self._device)
        memory = self.model.encode(src)  # (1, S, d_model)
        mask = torch.ones_like(src)
        return cache, self.model.decode(ids, memory, mask, cache=cache, last_only=last_only, source_ids=src)

    def _admit_beams(self, req: _Request) -> list[Delta]:
        """Prefill a beam-search prompt alone, take the group's first step, and add its rows."""
        assert req.beams is not None
        beams, group = req.beams, req.beams.group
        if group.budget <= 0:
            return beams.finish()
        cache, logits = self._prefill(
            group.prompt, req.source, True, self._rid_adapter.get(req.request_id, 0)
        )
        try:
            src = group.advance(logits[:, -1])
        except Exception as e:
            return beams.fail("error", f"{type(e).__name__}: {e}")
        if src is None:
            return beams.finish()
        self._join(cache, group.rows, len(group.prompt) + group.budget)
        self._running += [beams] * group.rows
        return []

    def _decode(self) -> list[Delta]:
        cache = self._cache
        assert cache is not None
        units = self._units()
        # speculative rows: the draft's proposals, verified by the one target forward below
        spec = [i for i, u in units if isinstance(u, Running) and u.spec]
        props: dict[int, list[int]] = {}
        if spec:
            assert self._drafter is not None
            k = self._drafter.k
            rows = [self._running[i] for i in spec]
            limits = [min(k, r.budget - len(r.seq.tokens) - 1) for r in rows if isinstance(r, Running)]
            props = dict(zip(spec, self._drafter.propose(limits), strict=True))
        T = 1 + max((len(p) for p in props.values()), default=0)
        B = len(self._running)
        real = None  # T > 1: right-padded, rows without proposals read one token
        pad = 0  # T == 1: padding rows after the batch's (batch_rows)
        if T == 1:  # one token per row: one tensor from a list (per-row tensors cost ~3 ops a row)
            feeds: list[int] = []
            for _, u in units:
                feeds += u.group.feeds if isinstance(u, _Beams) else [u.feed]
            pad = self._padded_rows(B, cache) - B
            if B + pad != self._decode_rows:  # the kernels' buffers of the last row count go (``release``)
                self._decode_rows = B + pad
                trim()
            ids = torch.tensor(feeds + [0] * pad, dtype=torch.long).view(B + pad, 1)
        else:
            ids = torch.zeros(B, T, dtype=torch.long)
            mask = torch.zeros(B, T, dtype=torch.long)
            for i, u in units:
                if isinstance(u, _Beams):
                    ids[i : i + u.rows, 0] = torch.tensor(u.group.feeds)
                    mask[i : i + u.rows, 0] = 1
                else:
                    fed = [u.feed, *props.get(i, [])]
                    ids[i, : len(fed)], mask[i, : len(fed)] = torch.tensor(fed), 1
            real = mask.to(self._device)
        # room for this step; when the cache must grow, to no more than the running rows can still use
        left = [u.group.budget if isinstance(u, _Beams) else u.budget - len(u.seq.tokens) for _, u in units]
        cache.reserve(T, limit=max(left, default=T))
        start = cache.length
        if self._enc_dec:  # the cross-attention keys are in the cache
            logits = self.model.decode(ids.to(self._device), None, attention_mask=real, cache=cache)
        elif pad:
            with cache.padded_rows(B + pad):
                logits = self.model(ids.to(self._device), cache=cache)[:B]
        else:
            logits = self.model(ids.to(self._device), attention_mask=real, cache=cache)
        out: list[Delta] = []
        keep: list[int] = []
        plain = {i: u for i, u in units if isinstance(u, Running) and not u.spec}  # sampled or greedy
        picked: dict[int, tuple[int, TokenLogprob | None]] = {}
        if plain:
            at = list(plain)
            first = logits[:, 0] if len(at) == B else logits[torch.tensor(at, device=self._device), 0]
            toks, lps = self._choose_safely(first, list(plain.values()))
            picked = {i: (t, lp) for i, t, lp in zip(at, toks, lps, strict=True)}
        slots = [1] * B  # cache slots each row keeps of this step's T
        accepted, nexts = [], []
        for i, u in units:
            if isinstance(u, _Beams):
                try:
                    src = u.group.advance(logits[i : i + u.rows, 0])
                except Exception as e:
                    out += u.fail("error", f"{type(e).__name__}: {e}")
                    continue
                if src is None:
                    out += u.finish()
                else:
                    keep += (src + i).tolist()
                continue
            if u.spec:  # the longest agreeing prefix of the proposals, then the target's own next token
                p = props[i]
                choices = logits[i, : 1 + len(p)].argmax(-1).tolist()
                m = 0
                while m < len(p) and p[m] == choices[m]:
                    m += 1
                slots[i] = 1 + m
                accepted.append(m)
                nexts.append(choices[m])
                for tok in choices[: m + 1]:
                    u.sampler.output_ids.append(tok)
                    out.append(u.delta(tok, None))
                    if u.seq.finish_reason is not None:
                        break
                else:
                    u.feed = choices[m]
                    keep.append(i)
                continue
            tok, lp = picked[i]
            if tok < 0:
                out.append(Delta(u.seq, None, u._flush()))
                continue
            out.append(u.delta(tok, lp))
            if u.seq.finish_reason is None:
                u.feed = tok
                keep.append(i)
        if T > 1:  # rejected proposals leave the cache (their slots become invalid, as padding)
            keep_slots(cache, start, slots)
        if spec:
            assert self._drafter is not None
            self._drafter.settle(accepted, nexts)
        self._retire(keep)
        return out

    def _padded_rows(self, B: int, cache: KVCache) -> int:
        """The rows a decoding step of the batch's ``B`` rows (one token each) runs: ``batch_rows`` when
        ``pad_shapes`` and the padding rows fit the cache's storage, else ``B``. Not for an
        encoder-decoder (its rows' cross keys) nor while a request runs a LoRA adapter (rows select
        theirs)."""
        if not self.pad_shapes or self._enc_dec or self._rid_adapter:
            return B
        P = batch_rows(B, self.max_batch_size)
        return P if P <= cache.max_batch_size else B

    def _retire(self, keep: list[int]) -> None:
        """Rows ``keep`` (in their new order: beam groups reorder their rows) stay; the others leave the
        batch and free their cache rows."""
        old = self._running
        if keep == list(range(len(old))):
            return
        self._running = [old[i] for i in keep]
        if self._cache is not None and not keep:
            self._cache = None  # the batch is empty: its storage goes now, not beside the next batch's
        elif self._cache is not None:
            self._cache.keep(torch.tensor(keep, dtype=torch.long))
        if self._drafter is not None:
            rank = {
                i: k for k, i in enumerate(i for i, u in enumerate(old) if isinstance(u, Running) and u.spec)
            }
            self._drafter.keep([rank[i] for i in keep if i in rank])
        still = {id(u) for u in self._running}
        gone = {id(u): u for u in old if id(u) not in still}
        with self._lock:
            ended = {
                self._owner.get(id(u.seqs[0] if isinstance(u, _Beams) else u.seq), -1) for u in gone.values()
            }
            for u in gone.values():
                for seq in u.seqs if isinstance(u, _Beams) else [u.seq]:
                    self._owner.pop(id(seq), None)
            if self._rid_adapter:  # forget the adapters of requests with no sequence left
                for r in ended - set(self._owner.values()):
                    self._rid_adapter.pop(r, None)

    def _choose_safely(
        self, logits: Tensor, rows: Sequence[Running]
    ) -> tuple[list[int], list[TokenLogprob | None]]:
        """``_choose``, but a row whose controls fail (e.g. every token banned) finishes alone with
        ``finish_reason="error"`` (token -1) instead of failing the whole batch."""
        try:
            return self._choose(logits, rows)
        except Exception as e:
            if len(rows) == 1:
                rows[0].seq.finish_reason, rows[0].seq.error = "error", f"{type(e).__name__}: {e}"
                return [-1], [None]
        tokens: list[int] = []
        lps: list[TokenLogprob | None] = []
        for i, r in enumerate(rows):
            try:
                t, lp = self._choose(logits[i : i + 1], [r])
            except Exception as e:
                r.seq.finish_reason, r.seq.error = "error", f"{type(e).__name__}: {e}"
                t, lp = [-1], [None]
            tokens += t
            lps += lp
        return tokens, lps

    def _choose(self, logits: Tensor, rows: Sequence[Running]) -> tuple[list[int], list[TokenLogprob | None]]:
        """The next token of each row (greedy, sampled or constrained) and its logprob when asked for."""
        logits = logits.float()
        masked = logits
        if any(r.constraint is not None for r in rows):
            at, masks = [], []
            for i, r in enumerate(rows):
                if r.constraint is not None:
                    allowed = r.constraint.allowed(r.budget - len(r.seq.tokens))
                    if allowed is not None:
                        at.append(i)
                        masks.append(allowed)
            if masks:  # one copy to the device and one pass (where: faster than masked_fill on CPU)
                ok = torch.ones(logits.shape, dtype=torch.bool)
                for i, allowed in zip(at, masks, strict=True):
                    ok[i] = allowed
                masked = logits.where(ok.to(logits.device), float("-inf"))
        if all(r.argmax for r in rows):  # greedy: one argmax for the batch, min_new_tokens' bans first
            V = logits.shape[-1]
            for i, r in enumerate(rows):
                if len(r.sampler.output_ids) < r.cfg.min_new_tokens and r.min_new_bans:
                    masked = logits.clone() if masked is logits else masked
                    # ids past the vocabulary cannot be chosen: nothing to ban (as apply_min_new_tokens)
                    masked[i, [t for t in r.min_new_bans if t < V]] = float("-inf")
            chosen = masked.argmax(-1)
            tokens = chosen.tolist()  # one read of the batch's tokens, not one per row
            for r, t in zip(rows, tokens, strict=True):
                r.sampler.output_ids.append(t)
        else:
            chosen = sample_batch(masked, [r.sampler for r in rows], accept=False)
            tokens = chosen.tolist()
            for i, r in enumerate(rows):
                if r.constraint is not None:  # the budget rule may swap in a token that closes the output
                    tokens[i] = chosen[i] = r.constraint.check(tokens[i], r.budget - len(r.seq.tokens))
                r.sampler.accept(tokens[i])
        lps: list[TokenLogprob | None] = [None] * len(rows)
        want = [i for i, r in enumerate(rows) if r.cfg.logprobs or r.cfg.top_logprobs]
        if want:
            k = max(rows[i].cfg.top_logprobs for i in want)
            idx = torch.tensor(want, device=logits.device)
            got = _to_list(token_logprobs(logits[idx], chosen[idx], k), [tokens[i] for i in want])
            for i, lp in zip(want, got, strict=True):
                lp.top = lp.top[: rows[i].cfg.top_logprobs]
                lps[i] = lp
        return tokens, lps

    def _constraint(self, cfg: GenerationConfig) -> Constraint | None:
        if not cfg.constrained:
            return None
        from lamina.generate.constrain import make_constraint

        assert self.tokenizer is not None
        return make_constraint(cfg, self.tokenizer, self.model.config.vocab_size, self.eos_token_ids)


def _length_groups(lengths: Sequence[int], bounds: Sequence[int] = ()) -> list[list[int]]:
    """Indices of ``lengths`` (tokens to prefill) in groups prefilled together, shortest first: a group
    grows while padding to its longest keeps it within twice its real tokens (plus a 64-token slack), and
    never across one of ``bounds`` (``lamina.model.quant.path_lengths``: int8/int4 layers compute a
    forward of that many tokens per row another way, so padding across it would change a row's numerics)."""
    groups: list[list[int]] = []
    group: list[int] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        n = lengths[i]
        crosses = group and pads_across(lengths[group[0]], n, bounds)
        if group and ((len(group) + 1) * n > 2 * (real + n) + 64 or crosses):
            groups.append(group)
            group, real = [], 0
        group.append(i)
        real += n
    return [*groups, group] if group else groups


def _to_list(lp: object, tokens: Sequence[int]) -> list[TokenLogprob]:
    from lamina.generate.sampling import TokenLogprobs

    assert isinstance(lp, TokenLogprobs)
    values, ranks = lp.logprobs.tolist(), lp.ranks.tolist()
    top_ids, top_lp = lp.top_ids.tolist(), lp.top_logprobs.tolist()
    return [
        TokenLogprob(t, v, r, list(zip(ti, tl, strict=True)))
        for t, v, r, ti, tl in zip(tokens, values, ranks, top_ids, top_lp, strict=True)
    ]


def generate_ids(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    configs: GenerationConfig | Sequence[GenerationConfig] = GREEDY,
    eos_token_ids: Sequence[int] = (),
    on_token: Callable[[int, int], None] | None = None,
    tokenizer: Tokenizer | None = None,
    max_batch_size: int | None = None,
    draft: Transformer | None = None,
    num_draft_tokens: int = SpeculativeOptions.num_draft_tokens,
) -> list[Sequence_]:
    """Generate from token-id ``prompts``; ``configs`` is one config for all or one per prompt.

    A config with ``n > 1`` gives n sequences for its prompt (each with its own random stream), one with
    ``num_beams`` > 1 its n best beams (beam search, in the same batch). The
    result lists every sequence, prompt by prompt. ``eos_token_ids`` (the model's) stop a sequence
    unless its config has ``ignore_eos``; its ``stop_token_ids`` always do. The stop token is not part
    of the output. ``on_token(sequence_index, token)`` sees every token as it is produced (not the one
    completing a stop string). Stop strings and constrained output need the ``tokenizer``; with it each
    sequence's ``text`` is set (cut before a stop string, or after it with
    ``include_stop_str_in_output``). All prompts run in one batch unless ``max_batch_size`` is smaller.
    ``draft`` decodes the greedy ones speculatively (``Engine``).
    """
    if not prompts:
        raise ConfigError("no prompts given")
    if any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token (empty prompt given)")
    cfgs = [configs] * len(prompts) if isinstance(configs, GenerationConfig) else list(configs)
    if len(cfgs) != len(prompts):
        raise ConfigError(
            f"{len(cfgs)} generation configs for {len(prompts)} prompts: give one, or one per prompt"
        )
    total = sum(max(c.n, c.num_beams) for c in cfgs)
    engine = Engine(
        model, tokenizer, eos_token_ids, max_batch_size=max_batch_size or total, draft=draft,
        num_draft_tokens=num_draft_tokens,
    )  # fmt: skip
    seqs: list[Sequence_] = []
    for i, (p, c) in enumerate(zip(prompts, cfgs, strict=True)):
        seqs += engine._submit(p, c, i, prompt_index=i)[1]
    flat = {id(s): k for k, s in enumerate(seqs)}
    while engine.has_work():
        for d in engine.step():
            if on_token is not None and d.token is not None and d.seq.stop_str is None:
                on_token(flat[id(d.seq)], d.token)
    return seqs


def greedy_decode(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_token_ids: Sequence[int] = (),
    on_token: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """Greedy continuations of token-id ``prompts``, each stopping at eos or ``max_new_tokens``."""
    cfg = GenerationConfig(temperature=0.0, max_new_tokens=max_new_tokens)
    return [s.tokens for s in generate_ids(model, prompts, cfg, eos_token_ids, on_token)]
