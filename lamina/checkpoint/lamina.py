"""lamina's own checkpoint folder: plain files, written atomically.

    config.yaml              the exact ModelConfig
    model.safetensors        weights (a tied output head is stored once, as tok_emb.weight)
    tokenizer.json           the tokenizer (HF ``tokenizers`` format)
    tokenizer_config.json    special tokens and chat template (HF keys)
    generation.yaml          default decoding controls (eos / stop ids, max_new_tokens)

A folder is first written next to its destination under a temporary name, then renamed into place, so a
crash never leaves a half-written checkpoint where a good one is expected.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lamina.config import GenerationConfig, ModelConfig, load_yaml, parse_yaml, save_yaml, to_dict
from lamina.errors import CheckpointError
from lamina.model.transformer import Transformer

if TYPE_CHECKING:
    from lamina.tokenizer import Tokenizer

CONFIG_FILE, WEIGHTS_FILE, GENERATION_FILE = "config.yaml", "model.safetensors", "generation.yaml"


def build_model(
    cfg: ModelConfig,
    state_dict: Mapping[str, torch.Tensor],
    dtype: torch.dtype | None = torch.float32,
    device: torch.device | str = "cpu",
) -> Transformer:
    """A ``Transformer`` holding exactly ``state_dict`` (no random init is spent on weights that get replaced).

    Missing or unexpected tensors raise ``CheckpointError`` listing them.
    """
    with torch.device("meta"):
        model = Transformer(cfg)
    sd = dict(state_dict)
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    expected = {k for k in model.state_dict() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    missing, unexpected = sorted(expected - sd.keys()), sorted(sd.keys() - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"weights do not match the config: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for name, param in model.state_dict().items():
        if name in sd and sd[name].shape != param.shape:
            raise CheckpointError(
                f"tensor {name} has shape {tuple(sd[name].shape)}, the config needs {tuple(param.shape)}"
            )
    sd = {
        k: v.to(device=device, dtype=dtype if v.is_floating_point() and dtype else v.dtype)
        for k, v in sd.items()
    }
    model.load_state_dict(sd, strict=False, assign=True)
    model.tie_weights()
    model.make_position_tables()  # made on the meta device above: make them for real
    return model.eval()


def weights_for_saving(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's tensors, contiguous, with a tied output head stored once."""
    _refuse_converted(model)
    return _storable(model.config, model.state_dict())


def _refuse_converted(model: Transformer) -> None:
    if model.weight_format is not None:  # packed int4/int8 buffers and fused projections: no checkpoint
        raise CheckpointError(
            f"this model was converted for inference (weights={model.weight_format!r}): save the model "
            "as loaded, before lamina.model.quant.convert_weights / lamina.load(..., weights=...)"
        )


def _storable(cfg: ModelConfig, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().contiguous()
        for k, v in weights.items()
        if not (cfg.tie_embeddings and k == "lm_head.weight")
    }


def write_checkpoint_files(
    folder: Path,
    cfg: ModelConfig | Any,
    weights: Mapping[str, torch.Tensor],
    tokenizer: Tokenizer | None = None,
    generation: GenerationConfig | None = None,
) -> None:
    """Write the files of a lamina checkpoint into ``folder`` (not atomic: see ``save_checkpoint``).
    A config other than a ``ModelConfig`` (``lamina.diffusion.unet.UNetConfig``) is written with its
    class's ``kind`` first (``kind: unet``), with the weights as given and no tokenizer or generation file."""
    if not isinstance(cfg, ModelConfig):
        text = yaml.safe_dump({"kind": type(cfg).kind, **to_dict(cfg)}, sort_keys=False)
        (folder / CONFIG_FILE).write_text(text)
        weights = {k: v.detach().contiguous() for k, v in weights.items()}
        save_file(dict(weights), str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
        return
    save_yaml(cfg, folder / CONFIG_FILE)
    save_file(_storable(cfg, weights), str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(folder)
    save_yaml(generation or GenerationConfig(), folder / GENERATION_FILE)


def atomic_folder(dest: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp_folder)``, then move the folder to ``dest`` in one rename, replacing an old one.

    An existing ``dest`` is replaced only when it is empty or a model folder (it holds ``config.yaml``
    or ``config.json``); any other folder or file raises ``CheckpointError`` before anything is written,
    so a checkpoint never deletes a user's files.
    """
    dest = Path(dest)
    if dest.exists() and not _replaceable(dest):
        raise CheckpointError(
            f"{dest} exists and is not a model folder; choose a new or empty folder (nothing was written)"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        write(tmp)
        for f in tmp.iterdir():  # flush file contents before the rename makes them visible
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if dest.exists():
            old = dest.parent / f".{dest.name}.old-{os.getpid()}"
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _replaceable(folder: Path) -> bool:
    if not folder.is_dir():
        return False
    names = {p.name for p in folder.iterdir()}
    return not names or bool(names & {"config.yaml", "config.json"})


def save_checkpoint(
    folder: str | os.PathLike[str],
    model: Transformer,
    tokenizer: Tokenizer | None = None,
    generation: GenerationConfig | None = None,
) -> Path:
    """Write a lamina checkpoint folder atomically; returns its path."""
    _refuse_converted(model)
    return atomic_folder(
        folder,
        lambda tmp: write_checkpoint_files(tmp, model.config, model.state_dict(), tokenizer, generation),
    )


def is_lamina_checkpoint(folder: str | os.PathLike[str]) -> bool:
    """True when ``folder`` looks like a lamina checkpoint (has config.yaml and model.safetensors)."""
    p = Path(folder)
    return (p / CONFIG_FILE).is_file() and (p / WEIGHTS_FILE).is_file()


def load_checkpoint(
    folder: str | os.PathLike[str],
    dtype: torch.dtype | None = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[Transformer, GenerationConfig]:
    """The model and default generation config of a lamina checkpoint folder."""
    folder = Path(folder)
    if not is_lamina_checkpoint(folder):
        raise CheckpointError(f"{folder} is not a lamina checkpoint (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    kind = (parse_yaml((folder / CONFIG_FILE).read_text()) or {}).get("kind")
    if kind is not None:
        raise CheckpointError(f"{folder} holds a {kind} model, not a language model; load it with "
                              f"lamina.diffusion.load_model (lamina diffusion sample {folder})")  # fmt: skip
    cfg = load_yaml(ModelConfig, folder / CONFIG_FILE)
    try:
        sd = load_file(str(folder / WEIGHTS_FILE))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {folder / WEIGHTS_FILE} (truncated or corrupt?): {e}") from e
    gen_path = folder / GENERATION_FILE
    gen = load_yaml(GenerationConfig, gen_path) if gen_path.is_file() else GenerationConfig()
    return build_model(cfg, sd, dtype=dtype, device=device), gen
