"""Tokenizers stored in GGUF metadata: the vocabulary, merges (or scores), token types and special-token ids
of a llama.cpp file, built into a Hugging Face ``tokenizers`` backend that gives the same ids as
``transformers``' GGUF converter. :meth:`lamina.tokenizer.Tokenizer.from_gguf_metadata` is the entry point.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

from lamina.errors import TokenizerError


def tokenizer_from_gguf_metadata(metadata: Mapping[str, Any]) -> tuple[Backend, dict[str, Any]]:
    """The backend and the ``Tokenizer`` keyword arguments (roles, ``add_bos_token``, ``add_eos_token``,
    ``chat_template``) that GGUF metadata describe; :meth:`Tokenizer.from_gguf_metadata` documents what is
    supported. Raises :class:`TokenizerError` for a missing, damaged or unsupported vocabulary.
    """
    model = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if model is None or tokens is None:
        raise TokenizerError(
            "the GGUF metadata holds no tokenizer (tokenizer.ggml.model or tokenizer.ggml.tokens is missing); "
            "fix: load the model's tokenizer.json with Tokenizer.from_file instead"
        )
    tokens = [str(t) for t in tokens]
    token_types = [int(t) for t in metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)]
    if len(token_types) != len(tokens):
        raise TokenizerError(
            f"the GGUF metadata lists {len(tokens)} tokens but {len(token_types)} token types; the file is "
            "damaged; fix: re-download or re-convert it"
        )
    architecture = metadata.get("general.architecture", "")
    if model == "gpt2":
        backend = _gguf_byte_level_bpe(metadata, tokens)
    elif model == "llama" and architecture not in _SENTENCEPIECE_VARIANTS:
        backend = _gguf_sentencepiece_bpe(metadata, tokens)
    else:
        what = f"tokenizer.ggml.model={model!r}" + (
            f" for architecture {architecture!r}" if model == "llama" else ""
        )
        raise TokenizerError(
            f"GGUF {what} is not supported; lamina builds 'gpt2' (byte-level BPE) and 'llama' "
            "(SentencePiece BPE) tokenizers; fix: load the model's tokenizer.json with Tokenizer.from_file"
        )

    # Tokens llama.cpp marks CONTROL (3) become special added tokens and USER_DEFINED (4) plain added
    # tokens, so both are matched whole in text. A byte-level "control" token spelled outside the byte
    # alphabet is a llama.cpp mislabel and is skipped, as transformers does.
    vocab = backend.get_vocab()
    alphabet = set(pre_tokenizers.ByteLevel.alphabet()) if model == "gpt2" else None
    control = [
        t
        for t, k in zip(tokens, token_types, strict=True)
        if k == 3 and (alphabet is None or set(t) <= alphabet)
    ]
    user_defined = [t for t, k in zip(tokens, token_types, strict=True) if k == 4 and t in vocab]
    roles: dict[str, str | None] = {}
    for role, key in (
        ("bos_token", "bos"),
        ("eos_token", "eos"),
        ("unk_token", "unknown"),
        ("pad_token", "padding"),
    ):
        index = metadata.get(f"tokenizer.ggml.{key}_token_id")
        roles[role] = tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None
    # transformers' builders also make their class defaults special (GPT2Tokenizer: <|endoftext|>;
    # LlamaTokenizer: <unk> <s> </s>). Where the vocabulary lacks one, transformers appends it as a new
    # id past the model's embedding; lamina does not (text holding that literal string differs).
    defaults = ["<|endoftext|>"] if model == "gpt2" else ["<unk>", "<s>", "</s>"]
    named = [t for t in [*control, *defaults, *roles.values()] if t is not None and t in vocab]
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in dict.fromkeys(named)])
    if user_defined:
        backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user_defined])
    for role, token in roles.items():
        if token is not None and token not in vocab:
            roles[role] = None

    add_bos = metadata.get("tokenizer.ggml.add_bos_token")
    if add_bos is None and model == "llama":
        add_bos = True  # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise
    return backend, dict(
        **roles,
        add_bos_token=bool(add_bos),
        add_eos_token=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        chat_template=metadata.get("tokenizer.chat_template"),
    )


# Split regexes for byte-level GGUF vocabularies, by `tokenizer.ggml.pre`: the table transformers' GGUF
# converter uses (integrations/gguf/gguf_tokenizer_mapping.py), so lamina's ids equal transformers'. Any
# other value ("gpt2", "smollm", "starcoder", ...) gets GPT-2's ByteLevel regex.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GGUF_PRE_TOKENIZER_SPLITS: dict[str, str] = {
    **dict.fromkeys(
        [
            *("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral"),
            *("midm-2.0", "lfm2", "jina-v5-nano", "dbrx", "smaug-bpe"),
        ],
        _LLAMA3_SPLIT,
    ),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"], _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], _GPT4O_SPLIT),
}

# SentencePiece vocabularies whose transformers builder differs from Llama's (respelled tokens, a
# normalizer instead of Metaspace): refused rather than built subtly wrong.
_SENTENCEPIECE_VARIANTS = frozenset({"gemma", "gemma2", "gemma3", "gemma4", "phi3"})


def _gguf_byte_level_bpe(metadata: Mapping[str, Any], tokens: list[str]) -> Backend:
    """Byte-level BPE (``tokenizer.ggml.model = "gpt2"``), as transformers builds it from the same file.

    Pre-tokenization follows transformers, which is not always llama.cpp. For ``tokenizer.ggml.pre =
    "smollm"`` (SmolLM, SmolLM2) transformers uses GPT-2's single ByteLevel regex
    ``'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+``, while
    llama.cpp (src/llama-vocab.cpp: SMOLLM shares its case with STARCODER, REFACT, COMMAND_R, CODESHELL,
    EXAONE and MINERVA; checked against a public copy of that file) first isolates every number character
    with ``\\p{N}`` and only then applies that regex (without the final ``|\\s+``), as SmolLM2's own
    tokenizer.json does with Digits(individual_digits=True) before ByteLevel. The vocabulary has only the
    ten single-digit tokens and no digit merges, so the two agree except where whitespace comes right
    before a number character (any ``\\p{N}``, also "½", "²", "Ⅻ", "١"):
      - two or more whitespace characters before a digit: "a  1" -> transformers/lamina
        ["a", "Ġ", "Ġ", "1"], llama.cpp ["a", "ĠĠ", "1"]; "x\\n\\n1" -> ["x", "Ċ", "Ċ", "1"] vs
        ["x", "ĊĊ", "1"] (GPT-2's regex binds one space to the number, or leaves the run split);
      - a space before a non-ASCII number character: " ½" -> ["ĠÂ", "½"] vs ["Ġ", "Â½"].
    On the 214 test strings of tests/test_tokenizer.py, 11 tokenize differently this way.
    The file's ``tokenizer.ggml.add_space_prefix`` is ignored, as transformers ignores it.
    """
    # Tokens are stored in the byte alphabet; one spelled otherwise (a raw added token) is respelled.
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
        for i, t in enumerate(tokens)
    }
    merges = _gguf_merges(metadata, tokens)
    backend = Backend(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    split = GGUF_PRE_TOKENIZER_SPLITS.get(str(metadata.get("tokenizer.ggml.pre")))
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    backend.decoder = decoders.ByteLevel()
    return backend


def _gguf_sentencepiece_bpe(metadata: Mapping[str, Any], tokens: list[str]) -> Backend:
    """SentencePiece BPE with byte fallback (``tokenizer.ggml.model = "llama"``), as transformers'
    ``LlamaTokenizer`` builds it: "▁" for spaces, one prepended to the text's first piece, merges from the
    file or rebuilt from the scores.

    Differences from llama.cpp: transformers (and lamina) always prepend "▁" (``prepend_scheme="first"``)
    and ignore ``tokenizer.ggml.add_space_prefix``; llama.cpp honours that flag. Both prepend only at the
    start of the text, not after a special token that begins it ("<s>hi" -> "<s>", "hi" in both).
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = Backend(
        models.BPE(
            vocab=vocab,
            merges=_gguf_merges(metadata, tokens),
            fuse_unk=True,
            byte_fallback=True,
            dropout=None,
        )
    )
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1),
        ]
    )
    return backend


def _gguf_merges(metadata: Mapping[str, Any], tokens: list[str]) -> list[tuple[str, str]]:
    """The file's merges, or (SentencePiece files have none) the merges its scores imply."""
    merges = metadata.get("tokenizer.ggml.merges")
    if merges is not None:
        pairs = [tuple(str(m).split(" ")) for m in merges]
        bad = next((m for m in pairs if len(m) != 2), None)
        if bad is not None:
            raise TokenizerError(
                f"GGUF merge {' '.join(bad)!r} is not two tokens separated by one space; the file is damaged"
            )
        return pairs  # type: ignore[return-value]  # checked: every pair has two items
    scores = metadata.get("tokenizer.ggml.scores")
    if scores is None:
        raise TokenizerError(
            "the GGUF tokenizer has neither tokenizer.ggml.merges nor tokenizer.ggml.scores, so its merges "
            "cannot be known; fix: load the model's tokenizer.json with Tokenizer.from_file"
        )
    if len(scores) != len(tokens):
        raise TokenizerError(
            f"the GGUF metadata lists {len(tokens)} tokens but {len(scores)} scores; the file is damaged; "
            "fix: re-download or re-convert it"
        )
    return _merges_from_scores(
        {t: i for i, t in enumerate(tokens)}, dict(zip(tokens, map(float, scores), strict=True))
    )


def _merges_from_scores(vocab: Mapping[str, int], scores: Mapping[str, float]) -> list[tuple[str, str]]:
    """Every split of a token into two vocabulary tokens is a merge, ranked by the token's score (higher
    first), then by the left and right pieces' lengths. Same order as transformers' ``generate_merges``,
    including how ties fall, which the ids depend on.
    """
    merges: list[tuple[str, str, float]] = []
    for token, score in scores.items():
        local = [
            (token[:i], token[i:], score)
            for i in range(1, len(token))
            if token[:i] in vocab and token[i:] in vocab
        ]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


@functools.cache
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet byte-level BPE vocabularies are spelled in)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = (b for b in range(256) if b not in table)
    table |= {b: chr(256 + n) for n, b in enumerate(extra)}
    return table
