"""sentence-transformers model folders: the files that say how hidden states become one vector per text.

    modules.json                 the module chain (Transformer, Pooling, optionally Normalize)
    1_Pooling/config.json        the pooling modes (``pooling_mode_mean_tokens``, ...)
    sentence_bert_config.json    ``max_seq_length`` and ``do_lower_case``

``EmbeddingConfig.from_folder`` reads them, ``EmbeddingConfig.write`` writes them (next to a HF export, so
``SentenceTransformer(folder)`` embeds as lamina does). ``lamina.embeddings`` computes the vectors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from lamina.errors import CheckpointError, ConfigError

Pooling = Literal["cls", "max", "mean", "mean_sqrt_len", "lasttoken"]
POOLINGS: tuple[str, ...] = get_args(Pooling)  # also the order sentence-transformers concatenates them in
_ST_KEYS = {  # lamina's pooling name -> sentence-transformers' 1_Pooling/config.json key
    "cls": "pooling_mode_cls_token",
    "max": "pooling_mode_max_tokens",
    "mean": "pooling_mode_mean_tokens",
    "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens",
    "lasttoken": "pooling_mode_lasttoken",
}


@dataclass
class EmbeddingConfig:
    """How hidden states become one vector per text.

    ``pooling``: one or more of cls, max, mean, mean_sqrt_len, lasttoken (several are concatenated);
    ``normalize``: scale to unit length; ``max_seq_len``: tokens per text, special tokens included
    (None: the model's context window); ``do_lower_case``: lower-case texts before tokenizing.
    """

    # how token states become one vector: one or more of cls, max, mean, mean_sqrt_len, lasttoken
    # (several are concatenated; sentence-transformers semantics)
    pooling: list[str] = field(default_factory=lambda: ["mean"])
    normalize: bool = True  # scale each vector to unit length (cosine similarity = dot product)
    max_seq_len: int | None = None  # tokens per text with special ones, >= 3 (None: the model's max_seq_len)
    do_lower_case: bool = False  # lower-case texts before tokenizing (uncased models)

    def __post_init__(self) -> None:
        bad = [p for p in self.pooling if p not in POOLINGS]
        if bad or not self.pooling:
            raise ConfigError(f"pooling={self.pooling!r} must be a non-empty list of {', '.join(POOLINGS)}")
        if self.max_seq_len is not None and self.max_seq_len < 3:
            raise ConfigError(f"max_seq_len={self.max_seq_len} must be >= 3 (room for [CLS], a token, [SEP])")

    @classmethod
    def from_folder(cls, folder: str | Path) -> EmbeddingConfig | None:
        """The config a sentence-transformers model folder describes, or None when it has no modules.json."""
        folder = Path(folder)
        if not (folder / "modules.json").is_file():
            return None
        try:
            modules = json.loads((folder / "modules.json").read_text())
            kinds = {m["type"].rsplit(".", 1)[-1]: m.get("path", "") for m in modules}
            pooling = ["mean"]
            if "Pooling" in kinds:
                pool_cfg = json.loads((folder / kinds["Pooling"] / "config.json").read_text())
                pooling = [p for p in POOLINGS if pool_cfg.get(_ST_KEYS[p])]
                if pool_cfg.get("pooling_mode_weightedmean_tokens"):
                    raise CheckpointError(f"{folder}: weighted-mean pooling is not supported by lamina")
            unknown = set(kinds) - {"Transformer", "Pooling", "Normalize"}
            if unknown:
                raise CheckpointError(
                    f"{folder / 'modules.json'} has sentence-transformers modules lamina does not run: "
                    f"{', '.join(sorted(unknown))} (lamina runs Transformer, Pooling, Normalize)"
                )
            st: dict[str, object] = {}
            if (folder / "sentence_bert_config.json").is_file():
                st = json.loads((folder / "sentence_bert_config.json").read_text())
        except (json.JSONDecodeError, KeyError, OSError) as e:
            raise CheckpointError(f"cannot read the sentence-transformers files in {folder}: {e}") from e
        max_len = st.get("max_seq_length")
        return cls(
            pooling=pooling,
            normalize="Normalize" in kinds,
            max_seq_len=int(max_len) if isinstance(max_len, int) else None,
            do_lower_case=bool(st.get("do_lower_case", False)),
        )

    def write(self, folder: str | Path, d_model: int) -> None:
        """Write the sentence-transformers files (modules.json, pooling and max length) into ``folder``."""
        folder = Path(folder)
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]  # fmt: skip
        if self.normalize:
            modules.append(
                {
                    "idx": 2,
                    "name": "2",
                    "path": "2_Normalize",
                    "type": "sentence_transformers.models.Normalize",
                }
            )
        (folder / "modules.json").write_text(json.dumps(modules, indent=2))
        (folder / "1_Pooling").mkdir(exist_ok=True)
        pool: dict[str, object] = {"word_embedding_dimension": d_model}
        pool |= {_ST_KEYS[p]: p in self.pooling for p in POOLINGS}
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(pool, indent=2))
        st = {"max_seq_length": self.max_seq_len, "do_lower_case": self.do_lower_case}
        (folder / "sentence_bert_config.json").write_text(json.dumps(st, indent=2))
