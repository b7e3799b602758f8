"""lamina: a complete, hackable large-language-model workbench on PyTorch.

The few things a user needs::

    import lamina
    lm = lamina.load("smollm2")                 # a path, a models-directory name or a packaged name
    print(lamina.generate(lm, "Hello!"))
    result = lamina.complete(lm, "Hello!", n=2, logprobs=True)  # every choice, with logprobs and counts

The names below are imported on first use (PEP 562), so ``import lamina`` and ``lamina --help`` do not
import torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lamina.checkpoint.convert import convert
    from lamina.checkpoint.lamina import load_checkpoint, save_checkpoint
    from lamina.checkpoint.load import LoadedModel, load, load_tokenizer
    from lamina.config import GenerationConfig, ModelConfig
    from lamina.embeddings import embed
    from lamina.errors import CheckpointError, ConfigError, LaminaError, ModelNotFoundError, TokenizerError
    from lamina.generate.text import complete, generate
    from lamina.model.transformer import Transformer
    from lamina.tokenizer import Tokenizer

__version__ = "0.1.0"

_PUBLIC = {  # name -> the module that defines it
    "convert": "lamina.checkpoint.convert",
    "load_checkpoint": "lamina.checkpoint.lamina",
    "save_checkpoint": "lamina.checkpoint.lamina",
    "LoadedModel": "lamina.checkpoint.load",
    "load": "lamina.checkpoint.load",
    "load_tokenizer": "lamina.checkpoint.load",
    "GenerationConfig": "lamina.config",
    "ModelConfig": "lamina.config",
    "embed": "lamina.embeddings",
    "CheckpointError": "lamina.errors",
    "ConfigError": "lamina.errors",
    "LaminaError": "lamina.errors",
    "ModelNotFoundError": "lamina.errors",
    "TokenizerError": "lamina.errors",
    "complete": "lamina.generate.text",
    "generate": "lamina.generate.text",
    "Transformer": "lamina.model.transformer",
    "Tokenizer": "lamina.tokenizer",
}

__all__ = [
    "CheckpointError",
    "ConfigError",
    "GenerationConfig",
    "LaminaError",
    "LoadedModel",
    "ModelConfig",
    "ModelNotFoundError",
    "Tokenizer",
    "TokenizerError",
    "Transformer",
    "__version__",
    "complete",
    "convert",
    "embed",
    "generate",
    "load",
    "load_checkpoint",
    "load_tokenizer",
    "save_checkpoint",
]


class _Lamina(types.ModuleType):
    """The ``lamina`` module: importing the subpackage ``lamina.generate`` must not hide the function
    ``lamina.generate`` (the import system sets a subpackage as its parent's attribute)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _PUBLIC and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Lamina


def __getattr__(name: str) -> Any:
    """``lamina.load`` and the other public names, imported from their module on first use."""
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'lamina' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
