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
row per choice and only the choices' tokens run after it, grouped by length (``score_continuations``).
Questions are batched by context length, longest first, so padding stays small.
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

    The contexts of a batch run once, left-padded, into a KV cache, and score every continuation's first
    token from their last position. The continuations longer than one token then run after copies of
    their context's cache rows, grouped by length (longest first, right-padded within a group: HellaSwag's
    endings of one question differ a lot in length); one-token continuations need no further pass.
    Requests are sorted by context length, longest first; ``batch_tokens`` bounds the padded context tokens
    plus the continuation tokens of one batch (so MMLU's long contexts with one-token choices and
    HellaSwag's long endings do not share a batch). A batch and a group close before padding passes
    ``PADDING`` (1/16) of their positions, and never pads across a length at which an int8 / int4 layer
    switches path (``lamina.model.quant.path_lengths``: its numerics would then depend on the batch-mates).
    A request longer than ``max_seq_len`` loses context tokens from the left (lm-eval truncates the same
    way). Log-softmax in float32. ``progress(done, total)`` counts requests.
    """
    from lamina.model.layers import KVCache
    from lamina.model.quant import pads_across, path_lengths

    cfg = model.config
    bounds = path_lengths(model)  # tokens per row where int8/int4 layers change numerics: never pad across
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
    order = sorted(range(len(prepared)), key=lambda i: (-len(prepared[i][0]), -prepared[i][2]))
    out: list[list[tuple[float, bool]]] = [[] for _ in prepared]
    p = next(model.parameters())
    device, dtype = p.device, p.dtype
    done = 0

    def run(batch: list[int]) -> None:
        ctxs = [prepared[i][0] for i in batch]
        conts = [c for i in batch for c in prepared[i][1]]
        owners = [b for b, i in enumerate(batch) for _ in prepared[i][1]]
        B, Lc = len(batch), max(map(len, ctxs))
        ids = torch.zeros(B, Lc, dtype=torch.long)
        mask = torch.zeros(B, Lc, dtype=torch.bool)
        for b, c in enumerate(ctxs):  # left padding: every context ends at the same slot
            ids[b, Lc - len(c) :] = torch.tensor(c)
            mask[b, Lc - len(c) :] = True
        cache = KVCache(cfg, B, Lc, dtype, device)
        last = model(ids.to(device), attention_mask=mask.to(device), cache=cache, last_only=True)
        first = last[:, -1].float().log_softmax(-1)[torch.tensor(owners, device=device)]  # (N, V)
        heads = torch.tensor([c[0] for c in conts], device=device)
        scores = first.gather(1, heads[:, None])[:, 0].tolist()
        greedy = (first.argmax(-1) == heads).tolist()
        # the choices' own tokens after copies of their context's cache
        for group in _length_groups(conts, bounds):
            Lk = len(conts[group[0]])
            sub = KVCache(cfg, 0, Lc + Lk - 1, dtype, device, max_batch_size=len(group))
            sub.add_rows(cache, [owners[r] for r in group])
            tgt = torch.zeros(len(group), Lk, dtype=torch.long)
            real = torch.zeros(len(group), Lk, dtype=torch.bool)
            for g, r in enumerate(group):
                tgt[g, : len(conts[r])] = torch.tensor(conts[r])
                real[g, : len(conts[r])] = True
            tgt, real = tgt.to(device), real.to(device)
            lg = model(tgt[:, :-1], attention_mask=real[:, :-1], cache=sub).float().log_softmax(-1)
            logp = (lg.gather(2, tgt[:, 1:, None])[..., 0] * real[:, 1:]).sum(1).tolist()
            hit = ((lg.argmax(-1) == tgt[:, 1:]) | ~real[:, 1:]).all(1).tolist()
            for g, r in enumerate(group):
                scores[r] += logp[g]
                greedy[r] = greedy[r] and hit[g]
            del lg, sub
        r = 0
        for i in batch:
            k = len(prepared[i][1])
            out[i] = [(float(s), bool(g)) for s, g in zip(scores[r : r + k], greedy[r : r + k], strict=True)]
            r += k

    batch: list[int] = []
    lc = nk = real = 0  # the batch's longest context, its continuation tokens, its context tokens
    for i in order:
        ctx, conts, _ = prepared[i]
        rows = (len(batch) + 1) * max(lc, len(ctx))  # context positions with this request in
        crosses = pads_across(len(ctx), lc, bounds)  # (lc: the batch's first, longest context)
        if batch and (
            rows + nk + sum(map(len, conts)) > batch_tokens or _wasteful(rows, real + len(ctx)) or crosses
        ):
            run(batch)
            done += len(batch)
            if progress is not None:
                progress(done, len(prepared))
            batch, lc, nk, real = [], 0, 0, 0
        batch.append(i)
        lc, nk, real = max(lc, len(ctx)), nk + sum(map(len, conts)), real + len(ctx)
    if batch:
        run(batch)
        done += len(batch)
        if progress is not None:
            progress(done, len(prepared))
    return out


PADDING = 1 / 16  # a batch / group closes before its padding passes this share of its positions
SMALL = 64  # ... unless it has at most this many positions


def _wasteful(positions: int, real: int) -> bool:
    """Whether a forward of ``positions`` padded positions holding ``real`` tokens pads too much."""
    return positions > SMALL and positions - real > PADDING * positions


def _length_groups(conts: Sequence[list[int]], bounds: Sequence[int] = ()) -> list[list[int]]:
    """Indices of the continuations longer than one token, longest first, cut into groups whose rows are
    padded to the group's first (longest) without ``_wasteful`` padding and never across one of ``bounds``
    (tokens per row: ``lamina.model.quant.path_lengths``; a group runs each continuation but its last
    token). One-token continuations need no pass (their token is scored from the context's last position)."""
    from lamina.model.quant import pads_across

    rest = sorted((r for r, c in enumerate(conts) if len(c) > 1), key=lambda r: -len(conts[r]))
    groups: list[list[int]] = []
    real = 0
    for r in rest:
        n = len(conts[r]) - 1
        top = len(conts[groups[-1][0]]) - 1 if groups else 0  # the group's tokens per row
        if (
            groups
            and not _wasteful((len(groups[-1]) + 1) * top, real + n)
            and not pads_across(n, top, bounds)
        ):
            groups[-1].append(r)
            real += n
        else:
            groups.append([r])
            real = n
    return groups


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
