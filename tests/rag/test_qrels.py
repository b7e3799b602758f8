"""The labeled questions shipped for the stdlib-docs corpus: at least 100, distinct, spread over many
modules, each naming documents the corpus has, none naming its answer."""

from __future__ import annotations

import re

from rag_fakes import stdlib_corpus

from lamina.rag.evaluate import STDLIB_QRELS, read_qrels


def test_the_shipped_questions_point_at_real_documents_without_naming_them() -> None:
    qrels = read_qrels("stdlib-docs")
    assert read_qrels(STDLIB_QRELS) == qrels
    assert len(qrels) >= 100
    assert len({q.question for q in qrels}) == len(qrels)
    corpus = stdlib_corpus()
    missing = [r for q in qrels for r in q.relevant if r not in corpus]
    assert not missing, f"relevant ids that are not stdlib-docs documents: {missing}"
    modules = {corpus[r].metadata["module"] for q in qrels for r in q.relevant}
    assert len(modules) >= 50
    named = [
        (q.question, r)
        for q in qrels
        for r in q.relevant
        if re.search(rf"\b{re.escape(r.rsplit('.', 1)[-1].lower())}\b", q.question.lower())
    ]
    assert not named, f"questions that name their answer: {named}"
