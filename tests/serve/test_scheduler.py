"""The scheduler's engine thread and the event loop: every request ends however late its deltas are read."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import torch

from lamina.config import GenerationConfig, ModelConfig
from lamina.generate.engine import Engine
from lamina.model.transformer import Transformer
from lamina.serve.metrics import Metrics
from lamina.serve.scheduler import Item, Job, Prompt, Scheduler


def _scheduler() -> Scheduler:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("llama-tiny", vocab_size=48, max_seq_len=96)).eval()
    # a short timeout: a request that hangs fails in seconds with a 504, not after 600 s
    return Scheduler(lambda: Engine(model, max_batch_size=8), name="tiny", metrics=Metrics(), timeout=20.0)


def test_requests_end_when_their_deltas_are_read_after_the_engine_finished_them() -> None:
    # before: a step holds two deltas of a new sequence (its admission token and its first decoded one);
    # read by the event loop after the engine had finished the sequence, both counted as its last delta,
    # so Job.events waited for one more (a 504 after the server's timeout, seen after a beam request);
    # with max_tokens=2 the engine thread itself died (a KeyError routing the step's deltas)
    scheduler = _scheduler()
    scheduler.start()
    try:

        async def run(max_tokens: int, num_beams: int = 1) -> list[int]:
            cfg = GenerationConfig(
                temperature=0.0, max_new_tokens=max_tokens, ignore_eos=True, num_beams=num_beams
            )
            job = scheduler.submit([Prompt([1, 2, 3], cfg)])
            deadline = time.monotonic() + 120  # a hang, not a speed, check: generous on a loaded machine
            while job.unfinished and time.monotonic() < deadline:  # the event loop is busy: no reading
                time.sleep(0.01)
            assert job.unfinished == 0
            await asyncio.sleep(0)  # the deltas reach the job's queue
            await job.wait()
            return job.seqs[0][0].tokens

        for max_tokens, num_beams in ((2, 1), (3, 1), (5, 2), (3, 1), (4, 1)):
            tokens = asyncio.run(run(max_tokens, num_beams))
            assert len(tokens) == max_tokens and scheduler.alive
    finally:
        scheduler.stop()


def test_a_first_token_is_posted_before_the_decoding_forward_of_its_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the step that admits a request prefills it and then decodes every running row (it too): its first
    # token used to reach the client only after that decoding forward, so the time to first token of a
    # cached system prompt was its short prefill plus a whole decoding step (Engine.step(emit=))
    scheduler = _scheduler()
    events: list[tuple[str, tuple[int, ...]]] = []
    forward, post = Transformer.forward, Job.post

    def recorded(self: Transformer, ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        events.append(("forward", tuple(ids.shape)))
        return forward(self, ids, *args, **kwargs)

    def posted(self: Job, item: Item) -> None:
        events.append(("post", (len(item) if isinstance(item, list) else 0,)))
        post(self, item)

    monkeypatch.setattr(Transformer, "forward", recorded)
    monkeypatch.setattr(Job, "post", posted)
    scheduler.start()
    try:

        async def run() -> list[int]:
            cfg = GenerationConfig(temperature=0.0, max_new_tokens=3, ignore_eos=True)
            job = scheduler.submit([Prompt([1, 2, 3, 4, 5], cfg)])
            await job.wait()
            return job.seqs[0][0].tokens

        tokens = asyncio.run(run())
    finally:
        scheduler.stop()
    assert len(tokens) == 3
    # the prefill (1, 5), the first token posted alone, then the decoding forwards (1, 1) and their tokens
    assert events == [("forward", (1, 5)), ("post", (1,)), ("forward", (1, 1)), ("post", (1,)),
                      ("forward", (1, 1)), ("post", (1,))]  # fmt: skip
    # a step is counted once, not once per hand-over of its deltas
    assert scheduler.metrics.value("decode_steps_total", model="tiny") == 2
