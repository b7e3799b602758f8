"""The sentence-transformers folder files live with the other checkpoint formats (no import circle through
lamina.embeddings); lamina.embeddings still exports the names it always did."""

from __future__ import annotations

import ast
from pathlib import Path

import lamina.embeddings
from lamina.checkpoint import sentence_transformers as st


def test_embeddings_reexports_the_folder_config() -> None:
    assert lamina.embeddings.EmbeddingConfig is st.EmbeddingConfig
    assert lamina.embeddings.POOLINGS == st.POOLINGS == ("cls", "max", "mean", "mean_sqrt_len", "lasttoken")


def test_checkpoint_formats_do_not_import_embeddings() -> None:
    """Today's circle was checkpoint/hf.py -> embeddings.py -> checkpoint/load.py (for EmbeddingConfig)."""
    folder = Path(st.__file__).parent
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert "lamina.embeddings" not in names, f"{path.name} imports lamina.embeddings"


def test_folder_files_round_trip(tmp_path: Path) -> None:
    cfg = st.EmbeddingConfig(
        pooling=["mean_sqrt_len", "lasttoken"], normalize=True, max_seq_len=9, do_lower_case=True
    )
    cfg.write(tmp_path, 16)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "1_Pooling",
        "modules.json",
        "sentence_bert_config.json",
    ]
    assert st.EmbeddingConfig.from_folder(tmp_path) == cfg
