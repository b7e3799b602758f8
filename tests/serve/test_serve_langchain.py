"""LangChain's `ChatOpenAI` (langchain-openai) pointed at a live lamina server, unchanged: chat and streaming."""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.slow


def test_langchain_chat_openai_invoke_and_stream(make_server: Any) -> None:
    from langchain_openai import ChatOpenAI

    server = make_server(api_keys=["lc-key"])
    llm = ChatOpenAI(
        model="smollm2",
        base_url=server.url + "/v1",
        api_key="lc-key",
        temperature=0,
        max_tokens=12,
        max_retries=0,
    )
    question = "What is the capital of France?"
    answer = llm.invoke(question)
    assert isinstance(answer.content, str) and answer.content
    assert answer.usage_metadata is not None and answer.usage_metadata["output_tokens"] <= 12
    chunks = list(llm.stream(question))
    assert len(chunks) > 2
    assert "".join(str(c.content) for c in chunks) == answer.content
    batch = llm.batch(["Say yes.", "Say no."])  # concurrent requests
    assert all(isinstance(m.content, str) and m.content for m in batch)
