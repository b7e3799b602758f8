"""Multiple-choice scoring by log-likelihood, as lm-evaluation-harness scores it, with each question's
context computed once for all its choices.

    result = evaluate_multiple_choice(lm, load_task("arc_easy", "data/"), shots=0)
    result.metrics   # {"acc": ..., "acc_stderr": ..., "acc_norm": ..., "acc_bytes": ..., ...}

A choice's score is the sum of the log-probabilities of its tokens after the context (lm-eval's
``loglikelihood``: continuation = target delimiter + choice; trailing spaces of the context move to the
continuation; the pair is encoded whole and split where the context's own tokens end; an empty context is
the end-of-text token). ``acc``: the highest score is the gold choice; ``acc_norm``: the same after dividing
each score by the choice's length in characters (lm-eval's ``acc_norm``); ``acc_bytes``: by its length in
UTF-8 bytes; ``mc2`` (TruthfulQA MC2, Lin et al. 2022): the probability mass of the true answers,
``sum(exp(ll_true)) / sum(exp(ll_all))``. Standard errors are lm-eval's: the sample standard deviation
(ddof 1) over sqrt(n).

Speed: the context of a question goes through the model once into a KV cache; the cache is copied to one
row per choice and only the choices' tokens run after it (``score_continuations``). Questions are batched
by length, longest first, so padding stays small.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from lamina.errors import ConfigError

if TYPE_CHECKING:
    from lamina.checkpoint.load import LoadedModel
    from lamina.eval.tasks import Task
    from lamina.model.transformer import Transformer
    from lamina.tokenizer import Tokenizer

Request = tuple[list[int], list[list[int]]]  # context ids, then each continuation's ids
Progress = Callable[[int, int], None]


def prefix_token_id(lm: LoadedModel) -> int:
    """The token an empty context stands for: the tokenizer's bos token, else its eos token (lm-eval's
    ``prefix_token_id`` for the ``hf`` backend)."""
    tok = lm.tokenizer
    assert tok is not None
    for token_id in (tok.bos_token_id, tok.eos_token_id):
        if token_id is not None:
            return int(token_id)
    if lm.generation.eos_token_ids:
        return int(lm.generation.eos_token_ids[0])
    raise ConfigError(f"model {lm.entry.name!r} has no end-of-text token to stand for an empty context")


def encode_pair(
    tok: Tokenizer, context: str, continuation: str, prefix_id: int
) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's causal ``TemplateLM`` makes them: trailing spaces of the
    context move to the continuation; context + continuation is encoded whole and split after the
    context's own token count; an empty context becomes ``[prefix_id]``."""
    if context == "":
        cont = tok.encode(continuation, add_special_tokens=False)
        return ([prefix_id], cont) if cont[:1] != [prefix_id] else (cont[:1], cont[1:])
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    return ctx, whole[len(ctx) :]


@torch.no_grad()
def score_continuations(
    model: Transformer,
    requests: Sequence[Request],
    batch_tokens: int = 2048,
    progress: Progress | None = None,
) -> list[list[tuple[float, bool]]]:
    """For each (context ids, [continuation ids, ...]): per continuation (sum of its tokens'
    log-probabilities given the context and the tokens before it, whether each token was the greedy one).

    The contexts of a batch run once, left-padded, into a KV cache; its rows are copied once per
    continuation and the continuations run after them, right-padded. ``batch_tokens`` bounds the padded
    context tokens plus padded continuation tokens of one batch (requests sorted longest first; counting
    the padding keeps questions of very different shapes, such as MMLU's long context with one-token
    choices and HellaSwag's long endings, out of one batch). A request longer than ``max_seq_len`` loses context tokens
    from the left (lm-eval truncates the same way). Log-softmax in float32. ``progress(done, total)`` counts
    requests.
    """
    from lamina.model.layers import KVCache

    cfg = model.config
    limit = cfg.max_seq_len
    prepared = []
    for ctx, conts in requests:
        if not ctx or not conts or any(not c for c in conts):
            raise ConfigError("every request needs a non-empty context and non-empty continuations")
        longest = max(len(c) for c in conts)
        if len(ctx) + longest - 1 > limit:
            ctx = ctx[len(ctx) + longest - 1 - limit :]
            if not ctx:
                raise ConfigError(f"a continuation of {longest} tokens does not fit max_seq_len {limit}")
        prepared.append((ctx, conts, longest))
    order = sorted(range(len(prepared)), key=lambda i: -(len(prepared[i][0]) + prepared[i][2]))
    out: list[list[tuple[float, bool]]] = [[] for _ in prepared]
    p = next(model.parameters())
    device, dtype = p.device, p.dtype
    done = 0

    def run(batch: list[int]) -> None:
        ctxs = [prepared[i][0] for i in batch]
        conts = [c for i in batch for c in prepared[i][1]]
        owners = [b for b, i in enumerate(batch) for _ in prepared[i][1]]
        B, N, Lc, Lk = len(batch), len(conts), max(map(len, ctxs)), max(len(c) for c in conts)
        ids = torch.zeros(B, Lc, dtype=torch.long)
        mask = torch.zeros(B, Lc, dtype=torch.bool)
        for b, c in enumerate(ctxs):  # left padding: every context ends at the same slot
            ids[b, Lc - len(c) :] = torch.tensor(c)
            mask[b, Lc - len(c) :] = True
        cache = KVCache(cfg, B, Lc + Lk, dtype, device, max_batch_size=max(B, N))
        last = model(ids.to(device), attention_mask=mask.to(device), cache=cache, last_only=True)
        first = last[:, -1].float().log_softmax(-1)[torch.tensor(owners, device=device)]  # (N, V)
        tgt = torch.zeros(N, Lk, dtype=torch.long)
        real = torch.zeros(N, Lk, dtype=torch.bool)
        for r, c in enumerate(conts):
            tgt[r, : len(c)] = torch.tensor(c)
            real[r, : len(c)] = True
        tgt, real = tgt.to(device), real.to(device)
        logp = first.gather(1, tgt[:, :1])  # (N, 1)
        greedy = first.argmax(-1, keepdim=True) == tgt[:, :1]
        if Lk > 1:  # the choices' own tokens after a copy of their context's cache
            cache.keep(torch.tensor(owners, device=device))
            lg = model(tgt[:, :-1], attention_mask=real[:, :-1], cache=cache).float().log_softmax(-1)
            logp = torch.cat([logp, lg.gather(2, tgt[:, 1:, None])[..., 0]], 1)  # (N, Lk)
            greedy = torch.cat([greedy, lg.argmax(-1) == tgt[:, 1:]], 1)
            del lg
        scores = (logp * real).sum(1).tolist()
        all_greedy = (greedy | ~real).all(1).tolist()
        r = 0
        for i in batch:
            k = len(prepared[i][1])
            out[i] = [
                (float(s), bool(g)) for s, g in zip(scores[r : r + k], all_greedy[r : r + k], strict=True)
            ]
            r += k

    batch: list[int] = []
    lc = lk = n = 0  # the batch's longest context, longest continuation, continuations
    for i in order:
        ctx, conts, longest = prepared[i]
        padded = (len(batch) + 1) * max(lc, len(ctx)) + (n + len(conts)) * max(lk, longest)
        if batch and padded > batch_tokens:
            run(batch)
            done += len(batch)
            if progress is not None:
                progress(done, len(prepared))
            batch, lc, lk, n = [], 0, 0, 0
        batch.append(i)
        lc, lk, n = max(lc, len(ctx)), max(lk, longest), n + len(conts)
    if batch:
        run(batch)
        done += len(batch)
        if progress is not None:
            progress(done, len(prepared))
    return out


# -- metrics ---------------------------------------------------------------------------------------------


def stderr(values: Sequence[float]) -> float:
    """lm-eval's ``mean_stderr``: sample standard deviation (ddof 1) / sqrt(n); 0 for fewer than 2."""
    n = len(values)
    if n < 2:
        return 0.0
    mu = sum(values) / n
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def _argmax(xs: Sequence[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))  # the first of equal maxima, as numpy


def choice_metrics(
    lls: Sequence[float], choices: Sequence[str], gold: int, labels: Sequence[int] | None = None
) -> dict[str, float]:
    """One question's metrics from its choices' log-likelihoods: acc, acc_norm (by characters), acc_bytes
    (by UTF-8 bytes), and mc2 (probability mass of the true answers) when ``labels`` are given."""
    chars = [ll / max(len(c), 1) for ll, c in zip(lls, choices, strict=True)]
    nbytes = [ll / max(len(c.encode("utf-8")), 1) for ll, c in zip(lls, choices, strict=True)]
    out = {
        "acc": float(_argmax(lls) == gold),
        "acc_norm": float(_argmax(chars) == gold),
        "acc_bytes": float(_argmax(nbytes) == gold),
    }
    if labels is not None:
        p = [math.exp(ll) for ll in lls]
        out = {"mc2": sum(x for x, t in zip(p, labels, strict=True) if t) / sum(p)}
    return out


@dataclass
class TaskResult:
    """A task's scores: ``metrics`` (mean and ``NAME_stderr`` of each metric, ``n``, ``skipped``) and one
    record per item (``samples``: id, context, choices' log-likelihoods, gold, per-item metrics)."""

    task: str
    metrics: dict[str, float]
    samples: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def summarize(task: str, samples: list[dict[str, Any]], skipped: list[str]) -> TaskResult:
    """Mean and standard error of every per-item metric in ``samples[i]["metrics"]``."""
    names = list(samples[0]["metrics"]) if samples else []
    metrics: dict[str, float] = {}
    for name in names:
        values = [s["metrics"][name] for s in samples]
        metrics[name] = sum(values) / len(values)
        metrics[f"{name}_stderr"] = stderr(values)
    metrics["n"] = len(samples)
    metrics["skipped"] = len(skipped)
    return TaskResult(task, metrics, samples, skipped)


def build_requests(
    lm: LoadedModel, task: Task, shots: int = 0, seed: int = 1234, limit: int | None = None
) -> tuple[list[str], list[Request]]:
    """Each item's full prompt (few-shot examples drawn with ``seed``) and its token request."""
    if lm.tokenizer is None:
        raise ConfigError(f"model {lm.entry.name!r} has no tokenizer; multiple-choice scoring needs one")
    rng = random.Random(seed)
    items = task.items[:limit] if limit is not None else task.items
    prefix = prefix_token_id(lm)
    contexts, requests = [], []
    for item in items:
        context = task.context(item, shots, rng)
        pairs = [encode_pair(lm.tokenizer, context, task.target_delimiter + c, prefix) for c in item.choices]
        contexts.append(context)
        requests.append((pairs[0][0], [cont for _, cont in pairs]))
    return contexts, requests


def evaluate_multiple_choice(
    lm: LoadedModel,
    task: Task,
    shots: int = 0,
    seed: int = 1234,
    limit: int | None = None,
    batch_tokens: int = 2048,
    progress: Progress | None = None,
) -> TaskResult:
    """Score ``task`` (kind "multiple_choice" or "mc2") with ``shots`` examples (drawn with ``seed``;
    MMLU takes the first k of the subject's dev file) on the first ``limit`` items. See the module doc."""
    from lamina.generate.engine import require_generative

    require_generative(lm.model.config, lm.entry.name)
    if task.kind not in ("multiple_choice", "mc2"):
        raise ConfigError(f"task {task.name} is a generation task; use evaluate_generation")
    contexts, requests = build_requests(lm, task, shots, seed, limit)
    for _, conts in requests:
        if any(len(c) == 0 for c in conts):
            raise ConfigError(f"task {task.name}: a choice encodes to no tokens")
    scored = score_continuations(lm.model, requests, batch_tokens, progress)
    samples = []
    for n, (item, context, result) in enumerate(zip(task.items, contexts, scored, strict=False)):
        lls = [ll for ll, _ in result]
        labels = item.labels if task.kind == "mc2" else None
        samples.append({
            "id": n, "source": item.source, "context": context, "choices": item.choices, "gold": item.gold,
            "loglikelihoods": lls, "greedy": [g for _, g in result],
            "metrics": choice_metrics(lls, item.choices, item.gold, labels),
        })  # fmt: skip
    return summarize(task.name, samples, task.skipped)
