"""lm-eval's own HellaSwag preprocessing, so hellaswag_local.yaml prompts exactly as its hellaswag task."""

from lm_eval.tasks.hellaswag.utils import process_docs

__all__ = ["process_docs"]
