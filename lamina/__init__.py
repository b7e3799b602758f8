"""lamina: a complete, hackable large-language-model workbench on PyTorch."""

from __future__ import annotations

from lamina.errors import CheckpointError, ConfigError, LaminaError, ModelNotFoundError, TokenizerError

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "LaminaError",
    "ModelNotFoundError",
    "TokenizerError",
    "__version__",
]
