"""Indexing and querying: documents -> chunks -> embeddings in a store; questions -> retrieval -> answers
with numbered citations. See :mod:`lamina.rag.types` for the shared nouns."""

from lamina.rag.ask import ask as ask  # lamina.rag.ask(...) is the function (it shadows its module's name)
