"""Continuous batching for the server: one engine thread, many asyncio requests.

The ``Engine`` does the batching (requests join the running batch between decode steps and leave it the
step they finish); the ``Scheduler`` runs its ``step`` loop in one background thread and connects it to
the event loop:

- ``submit`` (on the event loop) checks the queue bound (429 with ``Retry-After`` when full) and the
  tokens-in-flight limit, queues the request's prompts in the engine and returns a ``Job``;
- the engine thread steps while there is work, sleeps when there is none, and hands each step's deltas
  to their job's ``asyncio.Queue`` with ``loop.call_soon_threadsafe`` (one call per job per step; the
  first tokens of newly admitted requests go before the step's decoding forward, ``Engine.step(emit=)``,
  so a request's time to first token is its prefill, not its prefill and a decoding step);
- ``Job.events()`` yields ``(prompt index, Delta)`` on the event loop, raising a 504 ``APIError`` when the
  request's timeout passes (the job is then cancelled); ``Job.cancel()`` (client disconnected) makes its
  sequences leave the batch at the next step;
- if a step raises, every job in flight gets a 500 error and the engine is rebuilt: the server keeps
  serving.

Beam search (``num_beams`` > 1) and speculative decoding (an engine built with a draft) are modes of the
engine: a beam request occupies ``num_beams`` rows of the batch and its n best beams arrive as finishing
deltas, each with its whole text, the step the search ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from lamina.config import GenerationConfig
from lamina.errors import ConfigError
from lamina.generate.engine import Delta, Engine, Sequence_
from lamina.serve.errors import APIError, bad_request
from lamina.serve.metrics import Metrics

log = logging.getLogger("lamina.serve")

Item = list[tuple[int, Delta]] | APIError


@dataclass
class Prompt:
    """One engine request of a job: prompt token ids and decoding controls."""

    ids: list[int]
    config: GenerationConfig


class Job:
    """The engine requests of one HTTP request, and the queue their deltas arrive on."""

    def __init__(
        self, scheduler: Scheduler, seqs: list[list[Sequence_]], timeout: float | None, arrived: float
    ) -> None:
        self.id = next(_job_ids)
        self.seqs = seqs  # per prompt, its n sequences
        self.arrived = arrived  # time.monotonic() at arrival
        self.timeout = timeout
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Item] = asyncio.Queue()
        self.cancelled = False
        self._scheduler = scheduler
        # engine-thread side
        self.unfinished = sum(len(s) for s in seqs)
        self.first_token_at: float | None = None
        self.last_token_at: dict[int, float] = {}

    @property
    def all_seqs(self) -> list[Sequence_]:
        """Every sequence of the job, prompt by prompt."""
        return [s for group in self.seqs for s in group]

    def post(self, item: Item) -> None:
        """Hand deltas (or an error) to the event loop; called from the engine thread."""
        with contextlib.suppress(RuntimeError):  # RuntimeError: the event loop has closed (shutdown)
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def cancel(self) -> None:
        """Stop every sequence of the job at the engine's next step (no-op once finished)."""
        if not self.cancelled:
            self.cancelled = True
            self._scheduler.cancel(self)

    async def events(self) -> AsyncIterator[tuple[int, Delta]]:
        """``(prompt index, delta)`` as the engine produces them, until every sequence has finished.

        Raises a 504 ``APIError`` (and cancels the job) when the server's timeout passes, and the
        engine's 500 ``APIError`` if a step failed.
        """
        left = sum(len(s) for s in self.seqs)
        deadline = None if self.timeout is None else self.arrived + self.timeout
        while left > 0:
            try:
                if deadline is None:
                    item = await self.queue.get()
                else:
                    item = await asyncio.wait_for(self.queue.get(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                self.cancel()
                self._scheduler.metrics.inc("request_timeouts_total", model=self._scheduler.name)
                raise APIError(
                    504,
                    f"The request did not finish within the server's timeout of {self.timeout:g} s "
                    "(lamina serve --timeout); ask for fewer tokens or retry later",
                    code="timeout",
                ) from None
            if isinstance(item, APIError):
                raise item
            for pi, delta in item:
                if delta.finished:
                    left -= 1
                yield pi, delta

    async def wait(self) -> None:
        """Wait until every sequence has finished (their ``text``, ``tokens``, ... are then final)."""
        async for _ in self.events():
            pass


_job_ids = itertools.count()


class Scheduler:
    """Runs ``engine.step`` in a background thread and routes deltas to the jobs of HTTP requests.

    ``make_engine`` builds the engine (again after a failed step). ``max_queue`` bounds the requests
    waiting to join the batch; ``timeout`` (seconds, None = none) bounds a request from arrival to its
    last token. ``name`` labels the model's metrics.
    """

    def __init__(
        self,
        make_engine: Callable[[], Engine],
        *,
        name: str,
        metrics: Metrics,
        max_queue: int = 256,
        timeout: float | None = 600.0,
    ) -> None:
        if max_queue < 1:
            raise ConfigError(f"max_queue={max_queue} must be >= 1")
        if timeout is not None and timeout <= 0:
            raise ConfigError(f"timeout={timeout} must be > 0 seconds (or None for no timeout)")
        self._make_engine = make_engine
        self.engine = make_engine()
        self.name, self.metrics = name, metrics
        self.max_queue, self.timeout = max_queue, timeout
        self._lock = threading.Lock()  # guards _owners, _jobs and engine replacement
        self._wake = threading.Condition()
        self._owners: dict[int, tuple[Job, int]] = {}  # id(Sequence_) -> (job, prompt index)
        self._jobs: set[Job] = set()
        self._stopping = False
        self._thread: threading.Thread | None = None
        metrics.set("running_sequences", lambda: self.engine.num_running, model=name)
        metrics.set("queued_requests", lambda: self.engine.num_queued, model=name)
        metrics.set("running_sequences_max", 0, model=name)
        metrics.set("kv_cache_bytes_max", 0, model=name)
        if self.engine.draft_stats is not None:  # speculative decoding: how often the draft is right
            metrics.set("draft_tokens_proposed", lambda: self._draft("proposed"), model=name)
            metrics.set("draft_tokens_accepted", lambda: self._draft("accepted"), model=name)

    # -- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread."""
        if self._thread is None or not self._thread.is_alive():
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name=f"lamina-engine-{self.name}", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the engine thread (jobs still in flight get a 503 error)."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self._fail_all(APIError(503, "The server is shutting down", code="server_shutdown"))

    @property
    def alive(self) -> bool:
        """Whether the engine thread is running."""
        return self._thread is not None and self._thread.is_alive()

    # -- requests -------------------------------------------------------------------------------------------
    def submit(self, prompts: Sequence[Prompt], arrived: float | None = None, adapter: int = 0) -> Job:
        """Queue the prompts of one HTTP request; call from the event loop. ``adapter`` k > 0 runs them
        through the model's k-th LoRA adapter (``Engine.submit``), in the batch with every other request.

        Raises a 429 ``APIError`` when the queue is full, 400 when a prompt needs more tokens in flight
        than the server allows or the engine refuses it, 503 when the engine thread is not running.
        """
        if not self.alive:
            raise APIError(503, "The engine is not running; the server is starting or stopping")
        queued = self.engine.num_queued
        if queued + len(prompts) > self.max_queue:
            self.metrics.inc("requests_rejected_total", model=self.name)
            raise APIError(
                429,
                f"The server is busy: {queued} requests are waiting and the queue holds at most "
                f"{self.max_queue} (lamina serve --max-queue); retry after a moment",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        limit = self.engine.max_tokens_in_flight
        for p in prompts:
            rows = max(p.config.n, p.config.num_beams)  # beam search keeps num_beams rows
            need = rows * (len(p.ids) + p.config.max_new_tokens)
            if limit is not None and need > limit:
                raise bad_request(
                    f"This request needs {need} tokens in flight ({rows} sequences x ({len(p.ids)} prompt + "
                    f"{p.config.max_new_tokens} completion tokens)) but the server allows at most {limit} "
                    "(lamina serve --max-tokens-in-flight); ask for fewer tokens or a smaller n",
                    param="max_tokens",
                    code="too_many_tokens_in_flight",
                )
        seqs: list[list[Sequence_]] = []
        with self._lock:
            engine = self.engine
            try:
                for p in prompts:
                    seqs.append(engine.submit(p.ids, p.config, adapter=adapter))
            except ConfigError as e:
                engine.cancel([s for group in seqs for s in group])
                raise bad_request(str(e)) from None
            job = Job(self, seqs, self.timeout, time.monotonic() if arrived is None else arrived)
            for pi, group in enumerate(seqs):
                for s in group:
                    self._owners[id(s)] = (job, pi)
            self._jobs.add(job)
        self.metrics.inc("prompt_tokens_total", sum(len(p.ids) for p in prompts), model=self.name)
        with self._wake:
            self._wake.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Make the job's sequences leave the batch (or the queue) at the next step."""
        self.engine.cancel(job.all_seqs)
        with self._wake:
            self._wake.notify()

    # -- the engine thread ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self.engine.has_work():
                    self._wake.wait()
                if self._stopping:
                    return
            try:
                self._dispatch(self.engine.step(emit=self._emit))
            except Exception as e:  # the step, or routing its deltas: never a dead thread and hung requests
                log.exception("engine step failed; failing the requests in flight and restarting the engine")
                self.metrics.inc("engine_failures_total", model=self.name)
                self._fail_all(
                    APIError(500, f"The engine failed ({type(e).__name__}: {e}); the request was dropped")
                )

    def _draft(self, which: str) -> float:
        stats = self.engine.draft_stats
        return float(getattr(stats, which)) if stats is not None else 0.0

    def _emit(self, deltas: list[Delta]) -> None:
        """The admission's deltas (first tokens), handed on before the step's decoding forward runs."""
        self._dispatch(deltas, step=False)

    def _dispatch(self, deltas: list[Delta], step: bool = True) -> None:
        """Route deltas to their jobs and record the metrics; ``step``: the call that ends an engine step
        (counts it and its batch size)."""
        now = time.monotonic()
        name, m = self.name, self.metrics
        running = self.engine.num_running
        by_job: dict[Job, list[tuple[int, Delta]]] = {}
        finished: list[Job] = []
        with self._lock:
            for d in deltas:
                owner = self._owners.get(id(d.seq))
                if owner is None:
                    continue
                job, pi = owner
                by_job.setdefault(job, []).append((pi, d))
                if d.finished:
                    del self._owners[id(d.seq)]
                    job.unfinished -= 1
                    if job.unfinished == 0:
                        self._jobs.discard(job)
                        finished.append(job)
        tokens = 0
        for job, items in by_job.items():
            job.post(items)
            for _, d in items:
                if d.finished and d.seq.score is not None:  # a beam: its tokens arrive with its last delta
                    tokens += len(d.seq.tokens)
                if d.token is not None:
                    tokens += 1
                    if job.first_token_at is None:
                        job.first_token_at = now
                        m.observe("time_to_first_token_seconds", now - job.arrived, model=name)
                    last = job.last_token_at.get(id(d.seq))
                    if last is not None:
                        m.observe("inter_token_latency_seconds", now - last, model=name)
                    job.last_token_at[id(d.seq)] = now
                if d.finished:
                    m.inc("sequences_finished_total", finish_reason=str(d.seq.finish_reason), model=name)
        for job in finished:
            m.observe("request_duration_seconds", now - job.arrived, model=name)
        if tokens:
            m.generated(tokens, model=name)
        if step and (running or tokens):
            m.inc("decode_steps_total", model=name)
            m.observe("batch_size", running, model=name)
            m.set_max("running_sequences_max", running, model=name)
            m.set_max("kv_cache_bytes_max", self.engine.cache_bytes, model=name)

    def _fail_all(self, error: APIError) -> None:
        """Every job in flight gets ``error``; the engine is rebuilt empty."""
        with self._lock:
            jobs, self._jobs, self._owners = self._jobs, set(), {}
            try:
                self.engine = self._make_engine()
            except Exception:  # pragma: no cover - building an engine over a loaded model does not fail
                log.exception("could not rebuild the engine")
        for job in jobs:
            job.post(error)
