"""Indexing and querying: documents -> chunks -> embeddings in a store; questions -> retrieval -> answers
with numbered citations. See :mod:`lamina.rag.types` for the shared nouns."""
