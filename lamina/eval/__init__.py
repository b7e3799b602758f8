"""Evaluation: metrics and runners that score a model's outputs. Modules are imported on use (``seq2seq``
needs the ``seq2seq`` extra), so importing this package costs nothing."""
