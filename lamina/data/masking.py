"""Masked-language-model batches (BERT): hide 15% of the tokens and ask the model for them.

Of the chosen positions, 80% become the mask token, 10% a random token and 10% stay as they are (Devlin
et al. 2019); the labels hold the original token there and ``-100`` everywhere else, so the loss counts
only the chosen positions. With whole-word masking the choice is made per word (a word-start token and
the tokens that continue it) and all its tokens are hidden together. Special tokens are never chosen.

Masks are drawn from a generator seeded by (seed, batch index), so batch ``i`` is the same on every run
and on resume, and validation batches are masked identically at every evaluation.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from tokenizers import AddedToken
from torch import Tensor

from lamina.errors import ConfigError
from lamina.tokenizer import Tokenizer

IGNORE = -100
DEFAULT_MASK_TOKEN = "<|mask|>"
# byte-level BPE marks a leading space / newline / tab with these symbols: a token that starts with one
# starts a new word (GPT-2's alphabet: "Ġ" = space, "Ċ" = newline, "ĉ" = tab)
_BYTE_LEVEL_WORD_MARKS = ("Ġ", "Ċ", "ĉ")


def with_mask_token(tokenizer: Tokenizer, token: str = DEFAULT_MASK_TOKEN) -> Tokenizer:
    """``tokenizer`` itself when it has a mask token; else a copy with ``token`` added (a new last id)."""
    if tokenizer.mask_token_id is not None:
        return tokenizer
    backend = type(tokenizer.backend).from_str(tokenizer.backend.to_str())
    backend.add_special_tokens([AddedToken(token, special=True)])
    t = tokenizer
    return Tokenizer(
        backend, bos_token=t.bos_token, eos_token=t.eos_token, unk_token=t.unk_token,
        pad_token=t.pad_token, mask_token=token, chat_template=t.chat_template,
    )  # fmt: skip


def word_start_table(tokenizer: Tokenizer) -> Tensor:
    """(vocab_size,) bool: True where a token starts a word. WordPiece: every token but ``##`` pieces;
    byte-level BPE: tokens that begin with a space, newline or tab (and special tokens)."""
    vocab = tokenizer.get_vocab()
    table = torch.ones(max(vocab.values()) + 1, dtype=torch.bool)
    model = type(tokenizer.backend.model).__name__
    specials = {tokenizer.id_to_token(i) for i in special_ids(tokenizer)}
    for token, i in vocab.items():
        if token in specials:
            continue
        if model == "WordPiece":
            table[i] = not token.startswith("##")
        else:
            table[i] = token.startswith(_BYTE_LEVEL_WORD_MARKS)
    return table


def special_ids(tokenizer: Tokenizer) -> list[int]:
    """Ids of the tokenizer's special (added) tokens: never masked, never predicted."""
    backend = tokenizer.backend
    added = backend.get_added_tokens_decoder()
    return sorted(i for i, tok in added.items() if tok.special)


def mask_tokens(
    input_ids: Tensor,
    *,
    mask_id: int,
    vocab_size: int,
    generator: torch.Generator,
    probability: float = 0.15,
    special: Sequence[int] = (),
    word_starts: Tensor | None = None,
    attention_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(masked input ids, labels) for ``input_ids`` (B, T): see the module docstring.

    ``word_starts`` (vocab_size,) bool switches on whole-word masking. ``attention_mask`` (B, T) keeps
    padding out of the choice. At least one position per batch is chosen, so the loss is defined.
    """
    if not 0.0 < probability < 1.0:
        raise ConfigError(f"mlm_probability={probability} must be in (0, 1) (BERT uses 0.15)")
    ids = input_ids.long()
    can = ~torch.isin(ids, torch.tensor(list(special), dtype=torch.long))
    if attention_mask is not None:
        can &= attention_mask.bool()
    if word_starts is None:
        chosen = (torch.rand(ids.shape, generator=generator) < probability) & can
    else:
        starts = word_starts[ids.clamp(max=len(word_starts) - 1)] | ~can  # a special token: its own word
        starts[:, 0] = True
        word = starts.long().cumsum(1) - 1  # (B, T) word index within the row
        draw = torch.rand(ids.shape, generator=generator) < probability
        chosen = draw.gather(1, _first_index(word)) & can  # a word takes the draw of its first token
    if not chosen.any() and can.any():
        flat = can.flatten().nonzero().squeeze(1)
        pick_one = flat[torch.randint(len(flat), (1,), generator=generator)]
        chosen.view(-1)[pick_one] = True
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE))
    roll = torch.rand(ids.shape, generator=generator)
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator)
    masked = torch.where(chosen & (roll < 0.8), torch.full_like(ids, mask_id), ids)
    masked = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, masked)
    return masked, labels


def _first_index(word: Tensor) -> Tensor:
    """For each position, the index of the first position of its word (``word`` is non-decreasing)."""
    T = word.shape[1]
    pos = torch.arange(T).expand_as(word)
    first = torch.full_like(word, T)
    first.scatter_reduce_(1, word, pos, reduce="amin")  # first[b, w] = first position of word w
    return first.gather(1, word)


class MaskedBatches:
    """Wraps a source of ``{"input_ids": ...}`` batches (by index) into masked-LM batches
    ``{"input_ids", "labels"}``, masked with a generator seeded by (seed, index)."""

    def __init__(
        self,
        source: object,
        *,
        mask_id: int,
        vocab_size: int,
        special: Sequence[int],
        probability: float = 0.15,
        word_starts: Tensor | None = None,
        seed: int = 0,
    ) -> None:
        self.source, self.seed = source, seed
        self.kw = dict(mask_id=mask_id, vocab_size=vocab_size, probability=probability,
                       special=list(special), word_starts=word_starts)  # fmt: skip

    def mask(self, batch: dict[str, Tensor], index: int) -> dict[str, Tensor]:
        """The masked version of ``batch``, the ``index``-th of its stream."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        x, labels = mask_tokens(
            batch["input_ids"],
            generator=g,
            attention_mask=batch.get("attention_mask"),
            **self.kw,  # type: ignore[arg-type]
        )
        out = {"input_ids": x, "labels": labels}
        if "attention_mask" in batch:
            out["attention_mask"] = batch["attention_mask"]
        return out

    def batch(self, index: int) -> dict[str, Tensor]:
        """Masked batch ``index`` of the wrapped source."""
        return self.mask(self.source.batch(index), index)  # type: ignore[attr-defined]

    def masked_stream(self, batches: Iterable[dict[str, Tensor]]) -> Iterator[dict[str, Tensor]]:
        """Mask a stream of batches (validation): the k-th batch with generator (seed, k)."""
        for k, b in enumerate(batches):
            yield self.mask(b, k)
