"""Looking inside a model on one text: attention maps, the logit lens and per-token surprisal.

    ex = explain(lamina.load("smollm2"), "The capital of France is Paris.")
    ex.attentions        # (L, H, T, T) float32: row i is where token i attends; rows sum to 1
    ex.lens_top_ids      # (L, T): the top next-token of each layer's residual stream (the logit lens)
    ex.surprisal         # (T,) bits: -log2 p(token | the tokens before it); token 0 has none (nan)
    figures(ex, "out/")  # attention grid, one head at full size, logit-lens heatmap, surprisal: PNGs

**Attention maps** are the probabilities the model's own attention computes: while :func:`record_attention`
is active, every ``scaled_dot_product_attention`` call of :mod:`lamina.model.layers` is computed in the
explicit form ``softmax(q k^T * scale + mask) v`` (same inputs, masks, GQA sharing and scale; the output
equals the fused kernel's within float error, which a test checks) and its probabilities (B, H, T, S)
are kept, one per call, in the order the layers run (bertviz's ``output_attentions``).

**Logit lens** (nostalgebraist 2020): each block's output (the residual stream) goes through the model's
final norm and LM head, giving the next-token distribution that layer "has in mind"; the last layer's is
the model's own output distribution (a test checks it).

Decoder and encoder models with an LM head; an encoder-decoder's maps would mix three kinds of attention
and are refused (``ConfigError``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lamina.errors import ConfigError

if TYPE_CHECKING:
    from lamina.checkpoint.load import LoadedModel
    from lamina.model.transformer import Transformer


@dataclass
class ExplainConfig:
    """What ``lamina explain`` draws (the ``--out/--layer/--head/--max-tokens`` flags)."""

    out: str = "explain"  # folder for the PNGs
    layer: int = -1  # the layer of the full-size attention map (negative: from the last)
    head: int = 0  # the head of the full-size attention map
    max_tokens: int = 64  # explain the first N tokens of the text

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ConfigError(f"max_tokens={self.max_tokens} must be >= 1")
        if self.head < 0:
            raise ConfigError(f"head={self.head} must be >= 0")


class _AttentionRecorder:
    """Stands in for ``torch.nn.functional`` inside lamina.model.layers: everything passes through
    except ``scaled_dot_product_attention``, computed explicitly with its probabilities kept."""

    def __init__(self) -> None:
        self.probs: list[Tensor] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(F, name)

    def scaled_dot_product_attention(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        attn_mask: Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> Tensor:
        # q (B, Hq, T, d), k and v (B, Hk, S, d); a decoding step may pass q as (B, Hk, rep, d)
        if enable_gqa and k.shape[1] != q.shape[1]:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = (q @ k.transpose(-2, -1)).float() * (scale if scale is not None else q.shape[-1] ** -0.5)
        T, S = scores.shape[-2:]
        if is_causal:
            scores = scores.masked_fill(
                ~torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T), -math.inf
            )
        if attn_mask is not None:
            scores = (
                scores.masked_fill(~attn_mask, -math.inf)
                if attn_mask.dtype == torch.bool
                else scores + attn_mask
            )
        probs = scores.softmax(-1)
        self.probs.append(probs.detach())
        return (probs.to(v.dtype) @ v).to(q.dtype)


@contextlib.contextmanager
def record_attention() -> Iterator[list[Tensor]]:
    """Within the block, attention in lamina's layers is computed explicitly and its probabilities
    (B, H, T, S) float32 appended to the yielded list, one entry per attention call."""
    from lamina.model import layers

    recorder = _AttentionRecorder()
    saved = layers.F
    layers.F = recorder  # type: ignore[assignment]
    try:
        yield recorder.probs
    finally:
        layers.F = saved


@torch.no_grad()
def logit_lens(model: Transformer, input_ids: Tensor) -> Tensor:
    """Log-probabilities (L, B, T, V) of the next token read from each block's output through the final
    norm and LM head; ``[-1]`` equals ``model(input_ids).log_softmax(-1)``. Raises ``ConfigError``
    without an LM head."""
    if model.lm_head is None:
        raise ConfigError("the logit lens needs a language-model head (head='lm')")
    outputs: list[Tensor] = []
    hooks = [block.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for block in model.blocks]
    try:
        model.hidden_states(input_ids)
    finally:
        for h in hooks:
            h.remove()
    norm = model.final_norm if model.final_norm is not None else torch.nn.Identity()
    return torch.stack([model._lm_logits(norm(h)).float().log_softmax(-1) for h in outputs])


@dataclass
class Explanation:
    """What :func:`explain` found on one text of T tokens, for a model of L layers and H heads."""

    tokens: list[str]  # (T,) the text of each token
    ids: list[int]
    attentions: Tensor  # (L, H, T, T) float32 attention probabilities
    lens_top_ids: Tensor  # (L, T) each layer's most likely next token
    lens_top_probs: Tensor  # (L, T) its probability
    lens_target_logprobs: Tensor  # (L, T) log-prob each layer gives the actual next token (nan at the end)
    surprisal: Tensor  # (T,) bits of each token given those before it (nan for token 0)

    def table(self, tokenizer: Any) -> str:
        """Per-token surprisal and the logit lens's top next token at the first, middle and last layer."""
        L = self.lens_top_ids.shape[0]
        layers = sorted({0, L // 2, L - 1})
        lines = [f"{'pos':>4}  {'token':<16}{'bits':>7}  " + "".join(f"{'layer ' + str(i):<16}" for i in layers)
                 + "(logit lens: top next token)"]  # fmt: skip
        for t, token in enumerate(self.tokens):
            s = float(self.surprisal[t])
            bits = "" if math.isnan(s) else f"{s:.2f}"
            lens = "".join(f"{tokenizer.decode([int(self.lens_top_ids[i, t])])!r:<16}" for i in layers)
            lines.append(f"{t:>4}  {token!r:<16}{bits:>7}  {lens}")
        return "\n".join(lines)


@torch.no_grad()
def explain(lm: LoadedModel, text: str, max_tokens: int = 64) -> Explanation:
    """Attention maps, logit lens and surprisal of ``lm`` on the first ``max_tokens`` tokens of ``text``
    (see the module doc). Raises ``ConfigError`` for an encoder-decoder, a model without an LM head or
    tokenizer, or an empty text."""
    model, tok = lm.model, lm.tokenizer
    cfg = model.config
    if cfg.arch == "encoder-decoder":
        raise ConfigError("explain covers decoders and encoders; an encoder-decoder's three kinds of attention "
                          "are not drawn yet")  # fmt: skip
    if tok is None:
        raise ConfigError(f"model {lm.entry.name!r} has no tokenizer; explain needs one")
    if max_tokens < 1:
        raise ConfigError(f"max_tokens={max_tokens} must be >= 1")
    ids = tok.encode(text, split_special_tokens=True)[:max_tokens]
    if not ids:
        raise ConfigError("the text has no tokens: give some text to explain")
    x = torch.tensor([ids], device=next(model.parameters()).device)
    model.eval()
    with record_attention() as probs:
        logits = model(x)
    if cfg.head != "lm":
        raise ConfigError(
            f"explain needs a language-model head; model {lm.entry.name!r} has head={cfg.head!r}"
        )
    lens = logit_lens(model, x)[:, 0]  # (L, T, V)
    top_probs, top_ids = lens.exp().max(-1)
    target = torch.full(top_ids.shape, math.nan, device=x.device)
    target[:, :-1] = lens[:, :-1].gather(-1, x[0, 1:].expand(lens.shape[0], -1)[..., None])[..., 0]
    own = logits[0].float().log_softmax(-1)
    surprisal = torch.full((len(ids),), math.nan, device=x.device)
    surprisal[1:] = -own[:-1].gather(-1, x[0, 1:, None])[:, 0] / math.log(2)
    return Explanation(
        tokens=[tok.decode([i]) for i in ids],
        ids=ids,
        attentions=torch.stack([p[0] for p in probs]).cpu(),
        lens_top_ids=top_ids.cpu(),
        lens_top_probs=top_probs.cpu(),
        lens_target_logprobs=target.cpu(),
        surprisal=surprisal.cpu(),
    )


def figures(ex: Explanation, out: str | Path, tokenizer: Any, layer: int = -1, head: int = 0) -> list[Path]:
    """Write ``attention_grid.png`` (every layer x head), ``attention_L{layer}_H{head}.png`` (one head at
    full size with token labels), ``logit_lens.png`` (top token per layer and position, coloured by its
    probability) and ``surprisal.png`` into ``out``; returns their paths. Needs matplotlib (the train
    extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    A = ex.attentions.cpu().numpy()
    L, H, T, _ = A.shape
    if not -L <= layer < L or not 0 <= head < H:
        raise ConfigError(f"layer={layer}, head={head}: this model has layers 0..{L - 1} (or -1..-{L}) and heads "
                          f"0..{H - 1}")  # fmt: skip
    layer = layer % L
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = [t.replace("\n", "\\n") for t in ex.tokens]
    paths = []

    fig, axes = plt.subplots(L, H, figsize=(1.2 * H + 1, 1.2 * L + 1), squeeze=False)
    for i in range(L):
        for h in range(H):
            ax = axes[i][h]
            ax.imshow(A[i, h], cmap="viridis", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if h == 0:
                ax.set_ylabel(f"L{i}", fontsize=7)
            if i == 0:
                ax.set_title(f"H{h}", fontsize=7)
    fig.suptitle("attention probabilities (rows: query token, columns: key token)")
    paths.append(_save(fig, out / "attention_grid.png"))

    size = max(4.0, 0.35 * T + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(A[layer, head], cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(T), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(T), labels, fontsize=7)
    ax.set_title(f"layer {layer}, head {head}")
    fig.colorbar(im, ax=ax, fraction=0.046)
    paths.append(_save(fig, out / f"attention_L{layer}_H{head}.png"))

    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * T + 2), max(3.0, 0.35 * L + 1.5)))
    im = ax.imshow(ex.lens_top_probs.numpy(), cmap="magma", vmin=0, vmax=1, aspect="auto", origin="lower")
    for i in range(L):
        for t in range(T):
            word = tokenizer.decode([int(ex.lens_top_ids[i, t])]).replace("\n", "\\n")[:8]
            ax.text(t, i, word, ha="center", va="center", fontsize=5, color="cyan")
    ax.set_xticks(range(T), labels, rotation=90, fontsize=7)
    ax.set_ylabel("layer")
    ax.set_title("logit lens: each layer's top next token (colour: its probability)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    paths.append(_save(fig, out / "logit_lens.png"))

    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * T + 2), 3))
    ax.bar(range(T), [0 if math.isnan(float(s)) else float(s) for s in ex.surprisal])
    ax.set_xticks(range(T), labels, rotation=90, fontsize=7)
    ax.set_ylabel("surprisal (bits)")
    paths.append(_save(fig, out / "surprisal.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
