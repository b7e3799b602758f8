"""The :class:`Tokenizer`: train, load (``tokenizer.json``, a GGUF's vocabulary) and save, encode and decode,
special-token roles, chat templates; and :class:`DecodeStream` for printing ids as they come."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, overload

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as Backend

from lamina.errors import TokenizerError
from lamina.tokenizer.chat_template import Message, apply_chat_template, text_backend
from lamina.tokenizer.gguf_vocab import tokenizer_from_gguf_metadata

__all__ = ["DecodeStream", "Tokenizer"]

Kind = Literal["bpe", "unigram"]

# The special-token roles lamina knows, in the order Hugging Face's `special_tokens_map` lists them.
ROLES = ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token")
DEFAULT_SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>")
# The byte-level alphabet: every byte 0-255 as one printable character (GPT-2's trick), so any text encodes.
N_BYTE_SYMBOLS = 256


class Tokenizer:
    """A text <-> token-id mapping, with special-token roles and a chat template.

    Build one with :meth:`train`, :meth:`from_file`, :meth:`from_gguf` or :meth:`from_gguf_metadata`; or
    wrap any ``tokenizers.Tokenizer`` directly.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        unk_token: str | None = None,
        pad_token: str | None = None,
        mask_token: str | None = None,
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        chat_template: str | None = None,
    ) -> None:
        """Wrap ``backend`` and give its special tokens their roles.

        ``add_bos_token`` / ``add_eos_token``: when either is given, the backend's post-processor is
        replaced by one that adds exactly those (what ``transformers`` does with the same keys in
        ``tokenizer_config.json``); when both are None the backend's own post-processor is kept.
        """
        self.backend = backend
        self._roles: dict[str, str | None] = {
            "bos_token": bos_token,
            "eos_token": eos_token,
            "unk_token": unk_token,
            "pad_token": pad_token,
            "mask_token": mask_token,
        }
        for role, token in self._roles.items():
            if token is not None and backend.token_to_id(token) is None:
                raise TokenizerError(
                    f"{role}={token!r} is not in the vocabulary; fix: pass a token the tokenizer has "
                    f"(add it with special_tokens=[...] when training) or leave {role} unset"
                )
        self._add_bos_token = add_bos_token
        self._add_eos_token = add_eos_token
        if add_bos_token is not None or add_eos_token is not None:
            self._set_post_processor(bool(add_bos_token), bool(add_eos_token))
        self.chat_template = chat_template

    @property
    def add_bos_token(self) -> bool | None:
        """Whether :meth:`encode` prepends the bos token (None: as the backend's post-processor does)."""
        return self._add_bos_token

    @add_bos_token.setter
    def add_bos_token(self, value: bool) -> None:
        self._add_bos_token = value
        self._set_post_processor(value, bool(self._add_eos_token))

    @property
    def add_eos_token(self) -> bool | None:
        """Whether :meth:`encode` appends the eos token (None: as the backend's post-processor does)."""
        return self._add_eos_token

    @add_eos_token.setter
    def add_eos_token(self, value: bool) -> None:
        self._add_eos_token = value
        self._set_post_processor(bool(self._add_bos_token), value)

    def _set_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        # The same template transformers' `TokenizersBackend.update_post_processor` writes, so a saved
        # tokenizer.json and the one transformers rebuilds from tokenizer_config.json agree.
        bos, eos = self.bos_token, self.eos_token
        head = f"{bos}:0 " if add_bos and bos is not None else ""
        tail = f" {eos}:0" if add_eos and eos is not None else ""
        pair_head = f" {bos}:1" if head else ""
        pair_tail = f" {eos}:1" if tail else ""
        special = [(bos, self.bos_token_id)] if head else []
        special += [(eos, self.eos_token_id)] if tail else []
        single = f"{head}$A:0{tail}"
        pair = f"{single}{pair_head} $B:1{pair_tail}"
        self.backend.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=special
        )

    def __repr__(self) -> str:
        model = type(self.backend.model).__name__
        roles = ", ".join(f"{role}={token!r}" for role, token in self._roles.items() if token is not None)
        return f"Tokenizer({model}, vocab_size={self.vocab_size}{', ' + roles if roles else ''})"

    def __len__(self) -> int:
        """The vocabulary size, added tokens included (see :attr:`vocab_size`)."""
        return self.vocab_size

    # ------------------------------------------------------------------ building

    @classmethod
    def train(
        cls,
        texts: Iterable[str] | None = None,
        *,
        vocab_size: int = 8192,
        files: Sequence[str | os.PathLike[str]] | None = None,
        kind: Kind = "bpe",
        special_tokens: Sequence[str] | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        mask_token: str | None = None,
        min_frequency: int = 2,
        show_progress: bool = True,
        chat_template: str | None = None,
    ) -> Tokenizer:
        """Train a byte-level tokenizer on ``texts`` (an iterable of strings) or ``files`` (text files).

        ``kind``: "bpe" (byte-level BPE, as GPT-2/Llama-3/SmolLM) or "unigram" (a Unigram language
        model over the same byte alphabet). Both start from all 256 bytes, so any text round-trips.
        ``vocab_size`` counts everything: 256 byte symbols, the special tokens and the learned pieces.
        ``special_tokens`` defaults to ``["<|endoftext|>", "<|pad|>"]``; add chat-role tokens such as
        ``"<|im_start|>"`` here. The roles default to bos = eos = ``"<|endoftext|>"`` and pad =
        ``"<|pad|>"`` when those are among the special tokens; a role token that is not in the list is
        added to it. ``min_frequency`` (BPE only): a pair must occur this often to be merged.

        Args:
            vocab_size: tokens in the vocabulary: 256 bytes + special tokens + learned pieces
            kind: bpe (byte-level BPE, as GPT-2, Llama-3, SmolLM) or unigram (a Unigram language model)
            special_tokens: special tokens, e.g. '[<|endoftext|>, <|pad|>, <|im_start|>, <|im_end|>]' (none
                given: <|endoftext|> and <|pad|>)
            bos_token: the beginning-of-sequence token (default <|endoftext|> when it is special)
            eos_token: the end-of-sequence token (default <|endoftext|> when it is special)
            pad_token: the padding token (default <|pad|> when it is special)
            unk_token: the unknown token (byte-level tokenizers need none)
            mask_token: the mask token of masked-LM training (e.g. <|mask|>)
            min_frequency: BPE only: a pair must occur this often to be merged
            show_progress: show the trainer's progress bar
            chat_template: a Jinja chat template stored with the tokenizer
        """
        if kind not in ("bpe", "unigram"):
            raise TokenizerError(
                f"kind={kind!r} is not a tokenizer kind lamina trains; fix: use 'bpe' or 'unigram'"
            )
        if (texts is None) == (files is None):
            raise TokenizerError(
                "Tokenizer.train needs exactly one of texts=... or files=...; fix: pass one of them"
            )
        specials = list(dict.fromkeys(DEFAULT_SPECIAL_TOKENS if special_tokens is None else special_tokens))
        roles = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token}
        roles |= {"unk_token": unk_token, "mask_token": mask_token}
        for role, default in (
            ("bos_token", "<|endoftext|>"),
            ("eos_token", "<|endoftext|>"),
            ("pad_token", "<|pad|>"),
        ):
            if roles[role] is None and default in specials:
                roles[role] = default
        specials += [
            token for token in dict.fromkeys(roles.values()) if token is not None and token not in specials
        ]
        smallest = N_BYTE_SYMBOLS + len(specials) + 1
        if not isinstance(vocab_size, int) or vocab_size < smallest:
            raise TokenizerError(
                f"vocab_size={vocab_size!r} is too small for a byte-level {kind} tokenizer: it holds the "
                f"{N_BYTE_SYMBOLS} byte symbols and {len(specials)} special tokens before learning anything; "
                f"fix: pass vocab_size >= {smallest} (typical: 8000 to 64000)"
            )
        paths = [os.fspath(f) for f in files or ()]
        for path in paths:
            if not os.path.isfile(path):
                raise TokenizerError(f"training file {path!r} does not exist; fix: pass paths to text files")

        alphabet = pre_tokenizers.ByteLevel.alphabet()
        trainer: trainers.BpeTrainer | trainers.UnigramTrainer
        if kind == "bpe":
            backend = Backend(models.BPE())
            trainer = trainers.BpeTrainer(
                vocab_size=vocab_size,
                min_frequency=min_frequency,
                special_tokens=specials,
                initial_alphabet=alphabet,
                show_progress=show_progress,
            )
        else:
            backend = Backend(models.Unigram())
            trainer = trainers.UnigramTrainer(
                vocab_size=vocab_size,
                special_tokens=specials,
                initial_alphabet=alphabet,
                unk_token=roles["unk_token"],
                show_progress=show_progress,
            )
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        if files is not None:
            backend.train(paths, trainer)
        else:
            backend.train_from_iterator(texts if texts is not None else (), trainer)
        # Reload from JSON once: tokenizers writes and re-reads floats (Unigram scores) with a last-digit
        # change, which can flip ties between equal-scoring segmentations. After this, the tokenizer in
        # memory gives exactly the ids its saved tokenizer.json gives (in lamina and in transformers).
        backend = Backend.from_str(backend.to_str())
        return cls(backend, **roles, add_bos_token=False, add_eos_token=False, chat_template=chat_template)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load ``tokenizer.json``, or a folder holding it (a Hugging Face model folder or one written by
        :meth:`save`). The folder's ``tokenizer_config.json`` (roles, ``add_bos_token``, chat template) and
        ``chat_template.jinja`` are read when present.
        """
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise TokenizerError(
                f"no tokenizer file at {str(file)!r}; fix: point to a tokenizer.json or a folder holding one "
                "(a Hugging Face model folder, or one written by Tokenizer.save)"
            )
        try:
            backend = Backend.from_file(str(file))
        except Exception as e:
            raise TokenizerError(
                f"cannot read {str(file)!r} as a tokenizers JSON file ({e}); fix: pass a valid tokenizer.json"
            ) from e
        # A tokenizer.json may carry truncation/padding settings (all-MiniLM-L6-v2's pads every text to
        # 128 ids); like transformers, encode() ignores them: callers truncate and pad explicitly.
        backend.no_truncation()
        backend.no_padding()
        folder = file.parent
        config: dict[str, Any] = {}
        if (folder / "tokenizer_config.json").is_file():
            try:
                config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise TokenizerError(
                    f"{str(folder / 'tokenizer_config.json')!r} is not valid JSON ({e}); fix or delete it"
                ) from e
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default", next(iter(named.values()), None))
        if (folder / "chat_template.jinja").is_file():  # where transformers >= 4.50 saves it
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        roles = {role: _token_content(config.get(role)) for role in ROLES}
        # Like transformers: a role token that the backend lacks is added as a special token.
        missing = [t for t in roles.values() if t is not None and backend.token_to_id(t) is None]
        if missing:
            backend.add_special_tokens([AddedToken(t, special=True) for t in missing])
        return cls(
            backend,
            **roles,
            add_bos_token=config.get("add_bos_token"),
            add_eos_token=config.get("add_eos_token"),
            chat_template=template,
        )

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Build the tokenizer stored in a GGUF file's metadata (see :meth:`from_gguf_metadata`); the
        tensors are not read. Raises :class:`TokenizerError` when there is no file at ``path`` and
        ``CheckpointError`` when it is not a readable GGUF file.
        """
        from lamina.checkpoint.gguf import read_gguf  # lamina's one GGUF reader (imports torch: lazily)

        if not os.path.isfile(path):
            raise TokenizerError(f"no GGUF file at {os.fspath(path)!r}; fix: pass the path of a .gguf file")
        return cls.from_gguf_metadata(read_gguf(path).metadata)

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Build a tokenizer from GGUF metadata (GGUF key -> plain Python value).

        Supported ``tokenizer.ggml.model`` values: "gpt2" (byte-level BPE; the pre-tokenizer follows
        ``tokenizer.ggml.pre``) and "llama" (SentencePiece BPE, merges rebuilt from the scores when the
        file has none). The result gives the same ids as ``transformers``' tokenizer for the same file
        (``AutoTokenizer.from_pretrained(folder, gguf_file=name)``); see the comments in
        ``gguf_vocab._gguf_byte_level_bpe`` and ``gguf_vocab._gguf_sentencepiece_bpe`` for where llama.cpp
        splits differently.
        """
        backend, options = tokenizer_from_gguf_metadata(metadata)
        return cls(backend, **options)

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` to ``folder`` (created if needed), in the
        layout ``transformers.AutoTokenizer.from_pretrained(folder)`` loads. Returns the folder.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
        }
        config |= {role: token for role, token in self._roles.items() if token is not None}
        if self.add_bos_token is not None or self.add_eos_token is not None:
            config |= {"add_bos_token": bool(self.add_bos_token), "add_eos_token": bool(self.add_eos_token)}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (folder / "tokenizer_config.json").write_text(
            json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        return folder

    # ------------------------------------------------------------------ encoding and decoding

    def encode(
        self, text: str, add_special_tokens: bool = True, split_special_tokens: bool = False
    ) -> list[int]:
        """Token ids of ``text``. Special tokens written in the text (e.g. ``"<|im_start|>"``) map to their
        ids, as in ``transformers``; with ``split_special_tokens`` they are encoded as the plain text they
        are spelled with (``transformers``' option of the same name). ``add_special_tokens`` adds bos/eos
        as configured. Chat messages are encoded by :meth:`apply_chat_template`, which splits special
        tokens inside the messages only.
        """
        backend = text_backend(self.backend) if split_special_tokens else self.backend
        return list(backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_batch(
        self, texts: Sequence[str], add_special_tokens: bool = True, split_special_tokens: bool = False
    ) -> list[list[int]]:
        """Token ids of each text, encoded in parallel (``split_special_tokens`` as in ``encode``)."""
        backend = text_backend(self.backend) if split_special_tokens else self.backend
        encodings = backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [list(e.ids) for e in encodings]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """The text of ``ids``; bytes that do not form whole UTF-8 characters decode to U+FFFD."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_stream(
        self, skip_special_tokens: bool = False, prompt_ids: Sequence[int] = ()
    ) -> DecodeStream:
        """A :class:`DecodeStream` over this tokenizer, for printing tokens as they are generated."""
        return DecodeStream(self, skip_special_tokens=skip_special_tokens, prompt_ids=prompt_ids)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included: the embedding size a model needs (``len(hf_tokenizer)``)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        """The token -> id mapping, added tokens included."""
        return self.backend.get_vocab(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        """The id of ``token``, or None when it is not in the vocabulary."""
        return self.backend.token_to_id(token)

    def id_to_token(self, index: int) -> str | None:
        """The token of id ``index`` as the vocabulary spells it (byte-level: ``"Ġthe"``), or None."""
        return self.backend.id_to_token(index)

    # ------------------------------------------------------------------ special tokens

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The role -> token of every role that is set, e.g. ``{"bos_token": "<|im_start|>", ...}``."""
        return {role: token for role, token in self._roles.items() if token is not None}

    def _role_id(self, role: str) -> int | None:
        token = self._roles[role]
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token(self) -> str | None:
        """The beginning-of-sequence token, or None."""
        return self._roles["bos_token"]

    @property
    def eos_token(self) -> str | None:
        """The end-of-sequence token, or None."""
        return self._roles["eos_token"]

    @property
    def pad_token(self) -> str | None:
        """The padding token, or None."""
        return self._roles["pad_token"]

    @property
    def unk_token(self) -> str | None:
        """The unknown token, or None."""
        return self._roles["unk_token"]

    @property
    def mask_token(self) -> str | None:
        """The mask token (masked-LM training), or None."""
        return self._roles["mask_token"]

    @property
    def bos_token_id(self) -> int | None:
        """Id of the beginning-of-sequence token, or None."""
        return self._role_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        """Id of the end-of-sequence token, or None."""
        return self._role_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        """Id of the padding token, or None."""
        return self._role_id("pad_token")

    @property
    def unk_token_id(self) -> int | None:
        """Id of the unknown token, or None."""
        return self._role_id("unk_token")

    @property
    def mask_token_id(self) -> int | None:
        """Id of the mask token, or None."""
        return self._role_id("mask_token")

    @property
    def eos_token_ids(self) -> list[int]:
        """Ids that end generation: the eos token's (empty when there is none)."""
        eos = self.eos_token_id
        return [] if eos is None else [eos]

    # ------------------------------------------------------------------ chat templates

    @overload
    def apply_chat_template(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = ...,
        tokenize: Literal[False] = ...,
        *,
        tools: Sequence[Mapping[str, Any]] | None = ...,
        documents: Sequence[Mapping[str, Any]] | None = ...,
        chat_template: str | None = ...,
        **extra: Any,
    ) -> str: ...

    @overload
    def apply_chat_template(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = ...,
        tokenize: Literal[True] = ...,
        *,
        tools: Sequence[Mapping[str, Any]] | None = ...,
        documents: Sequence[Mapping[str, Any]] | None = ...,
        chat_template: str | None = ...,
        **extra: Any,
    ) -> list[int]: ...

    def apply_chat_template(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        chat_template: str | None = None,
        **extra: Any,
    ) -> str | list[int]:
        """Render ``messages`` (dicts with "role" and "content") with the chat template, exactly as
        ``transformers``' ``apply_chat_template`` does; with ``tokenize=True`` return the ids instead
        (encoded without adding bos/eos: the template writes them).

        With ``tokenize=True`` only the template's own text produces control (special) tokens: text in the
        messages, ``tools`` and ``documents`` that spells one (a user writing ``"<|im_end|>"``) is encoded
        as plain text, so nobody can forge a turn. For such text alone the ids differ from
        ``transformers`` (which parses it as the control token); otherwise they are the same (see
        :func:`encode_chat`). The rendered string (``tokenize=False``) cannot keep that distinction:
        :meth:`encode` of it parses every special token.

        ``add_generation_prompt`` ends the text with the header of an assistant turn. ``tools`` (JSON
        schemas), ``documents`` and ``extra`` keyword arguments are passed to the template as variables,
        as are the special tokens (``bos_token``, ``eos_token``, ...). ``chat_template`` overrides
        :attr:`chat_template` for this call.
        """
        template = chat_template if chat_template is not None else self.chat_template
        if template is None:
            raise TokenizerError(
                "this tokenizer has no chat template; fix: set tokenizer.chat_template = '...' (a Jinja "
                "template), pass chat_template=..., or load a model whose tokenizer_config.json or GGUF "
                "metadata (tokenizer.chat_template) has one"
            )
        return apply_chat_template(
            self.backend,
            template,
            messages,
            add_generation_prompt,
            tokenize,
            tools=tools,
            documents=documents,
            variables={**self.special_tokens_map, **extra},
        )


class DecodeStream:
    """Turn token ids, one at a time, into text deltas that never split a UTF-8 character.

    ``step(id)`` returns the new text ("" while a character's bytes are still incomplete, i.e. while the
    decoded text ends in U+FFFD); ``finish()`` returns what is left. The concatenated deltas equal
    ``tokenizer.decode(ids)``. Pass ``prompt_ids`` (the tokens before the first streamed one) so that a
    leading space of the first token is kept where decoders strip it at the start of a text.
    """

    def __init__(
        self, tokenizer: Tokenizer, skip_special_tokens: bool = False, prompt_ids: Sequence[int] = ()
    ) -> None:
        """Start a stream; the last few ``prompt_ids`` are context for decoding and are never emitted."""
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids = list(prompt_ids)[-6:]
        self._prefix = 0  # ids[prefix:read] are decoded only as context for what follows
        self._read = len(self._ids)  # ids[read:] are not emitted yet

    def _text(self, start: int, stop: int | None = None) -> str:
        return self._tokenizer.decode(self._ids[start:stop], skip_special_tokens=self._skip)

    def step(self, token_id: int) -> str:
        """Add one id; return the text it completes ("" when it completes none yet)."""
        self._ids.append(token_id)
        prefix, text = self._text(self._prefix, self._read), self._text(self._prefix)
        if len(text) <= len(prefix) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(prefix) :]

    def finish(self) -> str:
        """Return the held-back rest (incomplete bytes as U+FFFD) and empty the stream."""
        prefix, text = self._text(self._prefix, self._read), self._text(self._prefix)
        self._prefix = self._read = len(self._ids)
        return text[len(prefix) :]


def _token_content(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string, or an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None
