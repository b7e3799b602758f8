"""Tokenizers: train one, load one (HF ``tokenizer.json`` or the vocabulary inside a GGUF), encode and
decode, decode a stream of ids, and render chat templates.

A :class:`Tokenizer` wraps a Hugging Face ``tokenizers.Tokenizer`` (the Rust "backend", reachable as
``.backend``) and adds what lamina needs around it: the special tokens' roles (bos, eos, pad, unk, mask),
whether bos/eos are added when encoding, and the chat template.

    tok = Tokenizer.train(texts, vocab_size=8000)           # byte-level BPE
    tok.save("out/tokenizer")                               # tokenizer.json + tokenizer_config.json
    tok = Tokenizer.from_file("out/tokenizer")              # or a Hugging Face model folder
    tok = Tokenizer.from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    ids = tok.encode("Hello world")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, NoReturn, overload

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.utils
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as Backend

from lamina.errors import TokenizerError

__all__ = ["DecodeStream", "Tokenizer"]

Kind = Literal["bpe", "unigram"]
Message = Mapping[str, Any]

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
        vocab_size: int,
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
        """Build the tokenizer stored in a GGUF file's metadata (see :meth:`from_gguf_metadata`)."""
        import gguf  # imported here: reading GGUF pulls in numpy memory maps lamina needs nowhere else

        if not os.path.isfile(path):
            raise TokenizerError(f"no GGUF file at {os.fspath(path)!r}; fix: pass the path of a .gguf file")
        reader = gguf.GGUFReader(path)
        wanted = {"general.architecture", *(k for k in reader.fields if k.startswith("tokenizer."))}
        return cls.from_gguf_metadata({k: reader.fields[k].contents() for k in wanted if k in reader.fields})

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Build a tokenizer from GGUF metadata (GGUF key -> plain Python value).

        Supported ``tokenizer.ggml.model`` values: "gpt2" (byte-level BPE; the pre-tokenizer follows
        ``tokenizer.ggml.pre``) and "llama" (SentencePiece BPE, merges rebuilt from the scores when the
        file has none). The result gives the same ids as ``transformers``' tokenizer for the same file
        (``AutoTokenizer.from_pretrained(folder, gguf_file=name)``); see the comments in
        ``_gguf_byte_level_bpe`` and ``_gguf_sentencepiece_bpe`` for where llama.cpp splits differently.
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
        backend.add_special_tokens(
            [AddedToken(t, normalized=False, special=True) for t in dict.fromkeys(named)]
        )
        if user_defined:
            backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user_defined])
        for role, token in roles.items():
            if token is not None and token not in vocab:
                roles[role] = None

        add_bos = metadata.get("tokenizer.ggml.add_bos_token")
        if add_bos is None and model == "llama":
            add_bos = True  # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise
        return cls(
            backend,
            **roles,
            add_bos_token=bool(add_bos),
            add_eos_token=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
            chat_template=metadata.get("tokenizer.chat_template"),
        )

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

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids of each text, encoded in parallel."""
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
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
        if not messages:
            raise TokenizerError(
                "apply_chat_template got no messages; fix: pass at least one {'role': ..., 'content': ...}"
            )
        chat = []
        for message in messages:
            if not isinstance(message, Mapping):
                raise TokenizerError(
                    f"chat messages must be dicts with 'role' and 'content', got {message!r}"
                )
            # Like transformers: keys whose value is None are dropped (OpenAI clients send content=None)
            # and a message's reasoning is also given under the names templates read it by.
            plain = {k: _plain(v) for k, v in message.items() if v is not None}
            reasoning = next((plain[k] for k in _REASONING_FIELDS if plain.get(k) is not None), None)
            if reasoning is not None:
                plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
            chat.append(plain)
        variables = {**self.special_tokens_map, **{k: _plain(v) for k, v in extra.items()}}
        compiled = _compile_chat_template(template)

        def render(data: Mapping[str, Any]) -> str:
            try:
                return compiled.render(**data, add_generation_prompt=add_generation_prompt, **variables)
            except jinja2.TemplateError as e:
                raise TokenizerError(
                    f"the chat template failed on these messages: {e}; fix the messages or the template"
                ) from e

        data = {"messages": chat, "tools": _plain(tools), "documents": _plain(documents)}
        if not tokenize:
            return render(data)
        return encode_chat(
            self.backend, render, data, avoid=template + json.dumps(variables, ensure_ascii=False)
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


# ---------------------------------------------------------------------- GGUF vocabularies

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


# ---------------------------------------------------------------------- chat template rendering

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _token_content(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string, or an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _plain(value: Any) -> Any:
    """A copy of ``value`` made of plain JSON types, so a template sees no object with methods of its own
    (the sandbox does not know which are dangerous); anything else becomes a placeholder like "<ndarray>".
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, np.generic):  # np.bool_(False) must not become a truthy placeholder
        return _plain(value.item())
    # Subclasses (enums, ...) are stripped back to the base type's value.
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic models
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _raise_exception(message: str) -> NoReturn:
    """Templates call ``raise_exception("...")`` to reject a conversation."""
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    """``tojson`` as transformers defines it: no HTML escaping (Jinja's own escapes <, >, &, ')."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    """The current local time formatted with ``strftime`` (templates print today's date)."""
    return datetime.now().strftime(format)


class _TemplateDict:
    """``dict(...)`` and ``dict.fromkeys(...)`` for templates, without exposing the ``dict`` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """Jinja's ``namespace()`` refusing underscore-prefixed attributes (a path to CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        for name in dict(*rest, **kwargs):
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, *rest, **kwargs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot set the attribute {name!r} on a namespace"
            )


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks the assistant's text in training templates; it
    renders as its body (transformers uses it to build an assistant-token mask).
    """

    tags = {"generation"}  # noqa: RUF012  # the attribute Jinja reads

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return str(caller())


@functools.lru_cache(maxsize=32)
def _compile_chat_template(template: str) -> jinja2.Template:
    """Compile a chat template in the environment transformers renders them in: sandboxed, immutable
    arguments, ``trim_blocks`` and ``lstrip_blocks``, loop controls, and its ``tojson``, ``raise_exception``,
    ``strftime_now``, ``dict`` and ``namespace``.
    """
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(
            f"the chat template is not valid Jinja (line {e.lineno}: {e.message}); fix the template"
        ) from e


# ---------------------------------------------------------------------- user text never becomes control tokens

# Private-use characters stand in for text while a chat is encoded: placeholders (Supplementary Private Use
# Area-A) for control-token text found in messages, stand-ins (Area-B) for the template's control tokens.
_PLACEHOLDERS = range(0xF0000, 0xFFFFE)
_STAND_INS = range(0x100000, 0x10FFFE)


def text_backend(backend: Backend, extra: Sequence[AddedToken] = ()) -> Backend:
    """A tokenizer that encodes like ``backend`` except that special tokens written in the text are split
    as plain text (``encode_special_tokens``); ``extra`` tokens are added to it (not special, so they are
    still matched). It shares ``backend``'s model and pipeline (building it takes well under a millisecond
    for a 49k vocabulary) and leaves ``backend`` unchanged, so other threads can keep encoding with it.
    """
    clone = Backend(backend.model)
    for part in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        value = getattr(backend, part)
        if value is not None:
            setattr(clone, part, value)
    added = backend.get_added_tokens_decoder()
    # In id order, runs of one kind per call: each added token gets the id it has in `backend`.
    for special, run in itertools.groupby(sorted(added.items()), key=lambda kv: kv[1].special):
        tokens = [token for _, token in run]
        if special:
            clone.add_special_tokens(tokens)
        else:
            clone.add_tokens(tokens)
    if any(clone.token_to_id(token.content) != i for i, token in added.items()):
        clone = Backend.from_str(backend.to_str())  # ids with gaps: a full copy (slower, same ids)
    clone.encode_special_tokens = True
    if extra:
        clone.add_tokens(list(extra))
    return clone


def encode_chat(backend: Backend, render: Callable[[Any], str], data: Any, avoid: str = "") -> list[int]:
    """Token ids of ``render(data)`` in which only the template's own text makes control tokens.

    ``data`` holds what users write (messages, tools, documents: JSON-like values); ``render`` turns it
    into the prompt text (the chat template); ``avoid``: other text the template can print (its source,
    its variables). Control tokens are the added tokens marked special (``<|im_start|>``, ``<|eot_id|>``
    ...); added tokens that are not special (``<tool_call>`` in some vocabularies) are plain text for
    this purpose, as in ``transformers`` with ``split_special_tokens=True``.

    How: every string in ``data`` that holds control-token text gets a private-use placeholder in its
    place, and one ending (starting) with the first (last) characters of a control token gets a guard
    character there, so that the template's next text cannot complete the token. The template renders
    these strings like any text (``| trim`` and other filters keep the placeholders). The control tokens
    the tokenizer then finds in the rendered text are the template's own; they are swapped for stand-in
    added tokens, the placeholders for the text they hid, and the whole text is encoded once with special
    tokens split. The result is what ``transformers`` gives for the rendered text when only the
    template's control tokens are parsed: BPE merges across the border between a message and the
    template's text happen as in one plain encoding. When no string needs a placeholder or a guard (the
    usual case) it is exactly ``backend.encode(render(data))``, the ids ``transformers``'
    ``apply_chat_template(..., tokenize=True)`` gives.

    Limit: a template that itself writes a control token's text in pieces around a message (``<|`` +
    message + ``im_end|>``) is not guarded. Raises :class:`TokenizerError` if the encoding ends up with a
    control token the template did not write (a bug, never expected).
    """
    controls = {i: token for i, token in backend.get_added_tokens_decoder().items() if token.special}
    if not controls:
        return list(backend.encode(render(data), add_special_tokens=False).ids)
    strings = sorted(_strings(data))
    starts, ends, longest = _control_affixes(tuple(sorted({token.content for token in controls.values()})))
    hidden: dict[str, list[tuple[int, int]]] = {}  # string -> spans of control-token text in it
    guarded = []
    for text, encoding in zip(strings, backend.encode_batch(strings, add_special_tokens=False), strict=True):
        spans = [(a, b) for a, b, _ in _matched(text, encoding, controls)]
        core = text.strip()
        if spans:
            hidden[text] = spans
        elif core and (_ends_with_any(core, starts, longest) or _starts_with_any(core, ends, longest)):
            guarded.append(text)
    if not hidden and not guarded:
        return list(backend.encode(render(data), add_special_tokens=False).ids)

    # Placeholders: one per distinct hidden text, plus the guard (which stands for nothing).
    hidden_texts = sorted({text[a:b] for text, spans in hidden.items() for a, b in spans})
    used = set(avoid).union(*strings)
    guard, *marks = _free_chars(used, 1 + len(hidden_texts), _PLACEHOLDERS)
    restore: dict[int, str | None] = {ord(guard): None}
    restore |= {ord(mark): text for mark, text in zip(marks, hidden_texts, strict=True)}
    mark_of = dict(zip(hidden_texts, marks, strict=True))
    neutral = {
        text: _guard(_hide(text, spans, mark_of), starts, ends, longest, guard)
        for text, spans in hidden.items()
    }
    neutral |= {text: _guard(text, starts, ends, longest, guard) for text in guarded}
    rendered = render(_map_strings(data, lambda text: neutral.get(text, text)))

    # The control tokens found now are the template's: each kind gets a stand-in, matched like it.
    real = _matched(rendered, backend.encode(rendered, add_special_tokens=False), controls)
    kinds = sorted({i for _, _, i in real})
    stand_ins = dict(zip(kinds, _free_chars(set(rendered) | set(marks), len(kinds), _STAND_INS), strict=True))
    clone = text_backend(
        backend,
        [
            AddedToken(
                stand_ins[i],
                single_word=controls[i].single_word,
                lstrip=controls[i].lstrip,
                rstrip=controls[i].rstrip,
                normalized=controls[i].normalized,
                special=False,
            )
            for i in kinds
        ],
    )
    pieces, end = [], 0
    for a, b, i in real:
        pieces += [rendered[end:a].translate(restore), stand_ins[i]]
        end = b
    pieces.append(rendered[end:].translate(restore))
    back = {clone.token_to_id(char): i for i, char in stand_ins.items()}
    ids = clone.encode("".join(pieces), add_special_tokens=False).ids
    if sum(i in back for i in ids) != len(real):  # the clone matches no control token, only stand-ins
        raise TokenizerError(
            "encoding the chat lost or added a control token of the template; this is a bug in lamina, "
            "please report it with the chat template"
        )
    return [back.get(i, i) for i in ids]


def _matched(text: str, encoding: Any, controls: Mapping[int, AddedToken]) -> list[tuple[int, int, int]]:
    """(start, end, id) of the control tokens the tokenizer matched in ``text`` (not those its model made
    from other text, such as byte-fallback pieces marked special)."""
    return [
        (a, b, i)
        for i, (a, b) in zip(encoding.ids, encoding.offsets, strict=True)
        if i in controls and (controls[i].normalized or text[a:b].strip() == controls[i].content.strip())
    ]


def _strings(value: Any) -> set[str]:
    """Every string in a JSON-like value, dict keys included."""
    if isinstance(value, str):
        return {value}
    if isinstance(value, Mapping):
        return set().union(*(_strings(k) | _strings(v) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return set().union(*(_strings(v) for v in value))
    return set()


def _map_strings(value: Any, f: Callable[[str], str]) -> Any:
    """``value`` with ``f`` applied to every string in it (dict keys included)."""
    if isinstance(value, str):
        return f(value)
    if isinstance(value, Mapping):
        return {_map_strings(k, f): _map_strings(v, f) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_strings(v, f) for v in value]
    if isinstance(value, tuple):
        return tuple(_map_strings(v, f) for v in value)
    return value


@functools.lru_cache(maxsize=8)
def _control_affixes(contents: tuple[str, ...]) -> tuple[frozenset[str], frozenset[str], int]:
    """The proper prefixes and the proper suffixes of the control tokens' texts, and the longest's length."""
    starts = frozenset(c[:k] for c in contents for k in range(1, len(c)))
    ends = frozenset(c[k:] for c in contents for k in range(1, len(c)))
    return starts, ends, max(map(len, contents), default=0)


def _ends_with_any(text: str, affixes: frozenset[str], longest: int) -> bool:
    return any(text[-k:] in affixes for k in range(1, min(longest, len(text)) + 1))


def _starts_with_any(text: str, affixes: frozenset[str], longest: int) -> bool:
    return any(text[:k] in affixes for k in range(1, min(longest, len(text)) + 1))


def _hide(text: str, spans: Sequence[tuple[int, int]], mark_of: Mapping[str, str]) -> str:
    """``text`` with each span replaced by the placeholder of the text it covers."""
    pieces, end = [], 0
    for a, b in spans:
        pieces += [text[end:a], mark_of[text[a:b]]]
        end = b
    return "".join([*pieces, text[end:]])


def _guard(text: str, starts: frozenset[str], ends: frozenset[str], longest: int, guard: str) -> str:
    """``text`` with ``guard`` after its last non-space character if the text before it could begin a
    control token, and before its first one if the text after it could end one (inside the whitespace,
    so a template's ``| trim`` still removes the same spaces).
    """
    core = text.strip()
    if not core:
        return text
    head = len(text) - len(text.lstrip())
    tail = len(text.rstrip())
    after = guard if _ends_with_any(core, starts, longest) else ""
    before = guard if _starts_with_any(core, ends, longest) else ""
    return text[:head] + before + text[head:tail] + after + text[tail:]


def _free_chars(used: set[str], count: int, pool: range) -> list[str]:
    """``count`` characters of ``pool`` that are not in ``used``."""
    chars = list(itertools.islice((c for c in map(chr, pool) if c not in used), count))
    if len(chars) < count:
        raise TokenizerError(
            "the chat uses too many private-use characters to encode it safely; fix: remove them"
        )
    return chars
