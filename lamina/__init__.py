"""lamina: a complete, hackable large-language-model workbench on PyTorch.

The few things a user needs::

    import lamina
    lm = lamina.load("smollm2")                 # a path, a models-directory name or a packaged name
    print(lamina.generate(lm, "Hello!"))
    result = lamina.complete(lm, "Hello!", n=2, logprobs=True)  # every choice, with logprobs and counts
"""

from __future__ import annotations

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
