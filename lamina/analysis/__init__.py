"""Understanding and planning: scaling laws, compute and memory estimates."""
