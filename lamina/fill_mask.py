"""Fill-mask: what a masked-LM encoder predicts for each mask token in a text.

    lm = lamina.load("runs/bert/last")
    fill_mask(lm, "def [MASK](self):")   # [[Prediction(token="__init__", score=0.41, ...), ...]]

``[MASK]`` in the text stands for the tokenizer's mask token whatever it is spelled (``<|mask|>`` in
tokenizers lamina trains).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lamina.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from lamina.checkpoint.load import LoadedModel

MASK = "[MASK]"


@dataclass
class Prediction:
    """One candidate for one mask: the token id, its text, its probability, and the filled-in text."""

    token_id: int
    token: str
    score: float
    sequence: str


@torch.inference_mode()
def fill_mask(lm: LoadedModel, text: str, top_k: int = 5) -> list[list[Prediction]]:
    """The ``top_k`` most likely tokens for each mask in ``text``, most likely first, one list per mask.

    Args:
        text: the input, with ``[MASK]`` (or the tokenizer's own mask token) where a token is to be
            predicted; at most the model's ``max_seq_len`` tokens
        top_k: candidates shown per mask
    """
    model, tok = lm.model, lm.tokenizer
    if model.config.head != "lm" or model.config.arch != "encoder":
        decoder = model.config.arch == "decoder" and model.config.head == "lm"
        raise CheckpointError(
            f"model {lm.entry.name!r} (arch={model.config.arch!r}, head={model.config.head!r}) has no "
            "masked-LM head: fill-mask needs an encoder trained with masked LM (head='lm')"
            + ("; a decoder continues text with `lamina generate`" if decoder else "")
        )
    if tok is None or tok.mask_token is None or tok.mask_token_id is None:
        raise CheckpointError(
            f"model {lm.entry.name!r} has no tokenizer with a mask token: fill-mask needs one"
        )
    if top_k < 1:
        raise ConfigError(f"top_k={top_k} must be >= 1")
    text = text.replace(MASK, tok.mask_token) if tok.mask_token != MASK else text
    ids = tok.encode(text)
    where = [i for i, t in enumerate(ids) if t == tok.mask_token_id]
    if not where:
        raise ConfigError(f"no {MASK} in the text: write {MASK} where a token should be predicted")
    if len(ids) > model.config.max_seq_len:
        raise ConfigError(f"the text has {len(ids)} tokens, more than max_seq_len={model.config.max_seq_len}")
    x = torch.tensor([ids], device=model.tok_emb.weight.device)
    probs = model(x)[0, where].float().softmax(-1).cpu()  # (n_masks, vocab)
    probs = probs[:, : tok.vocab_size]  # ids past the tokenizer (vocab rounded up) are no tokens
    out = []
    for row, pos in zip(probs, where, strict=True):
        scores, cand = row.topk(min(top_k, len(row)))
        preds = []
        for s, c in zip(scores.tolist(), cand.tolist(), strict=True):
            filled = [*ids[:pos], c, *ids[pos + 1 :]]
            preds.append(
                Prediction(c, tok.decode([c]).strip(), s, tok.decode(filled, skip_special_tokens=True))
            )
        out.append(preds)
    return out
