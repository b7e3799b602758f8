"""lamina's error hierarchy: one base class, a few kinds, messages that say how to fix the problem."""

from __future__ import annotations


class LaminaError(Exception):
    """Base class of every error lamina raises on purpose.

    The CLI prints these on one line and exits non-zero (traceback only with ``--debug``).
    """


class ConfigError(LaminaError, ValueError):
    """A configuration value or combination of values is invalid."""


class CheckpointError(LaminaError):
    """A model or checkpoint file is missing, truncated, or in a format lamina cannot read."""


class ModelNotFoundError(CheckpointError, FileNotFoundError):
    """A model name or path does not resolve to anything on this machine."""


class TokenizerError(LaminaError):
    """A tokenizer cannot be built, loaded or used as asked."""


class DataError(LaminaError):
    """Training data cannot be found, read, prepared or batched as asked."""


class InputTooLongError(LaminaError, ValueError):
    """An input has more tokens than the model takes, and truncation was not asked for.

    ``index``: which input (0-based), ``n_tokens``: its length, ``limit``: the most tokens allowed.
    """

    def __init__(self, message: str, *, index: int, n_tokens: int, limit: int) -> None:
        super().__init__(message)
        self.index, self.n_tokens, self.limit = index, n_tokens, limit
