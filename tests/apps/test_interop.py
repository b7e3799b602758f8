"""LangChain's ChatOpenAI (``bind_tools``, ``with_structured_output``) and LlamaIndex's OpenAILike (chat,
streaming, tool calls, structured prediction) pointed at a live ``lamina serve`` with SmolLM2, unchanged.
Whatever the small model answers, calls and structured outputs parse and validate: the server decodes
them under the schema."""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("llguidance")


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


def test_langchain_bind_tools_and_structured_output(server: Any) -> None:
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    llm = ChatOpenAI(
        model="smollm2",
        base_url=server.url + "/v1",
        api_key="none",
        temperature=0,
        max_tokens=32,
        max_retries=0,
    )
    import jsonschema
    from langchain_core.utils.function_calling import convert_to_openai_tool

    schemas = {f.__name__: convert_to_openai_tool(f)["function"]["parameters"] for f in (add, get_weather)}
    message = llm.bind_tools([add, get_weather], tool_choice="any").invoke("Add 2 and 3.")
    assert message.tool_calls, message
    for call in message.tool_calls:  # valid against the schema LangChain sent (extra keys are allowed there)
        assert call["id"]
        jsonschema.validate(call["args"], schemas[call["name"]])

    class City(BaseModel):
        name: str = Field(max_length=30)
        population: int = Field(ge=0)

    city = llm.with_structured_output(City, method="json_schema").invoke("Describe Paris.")
    assert isinstance(city, City)  # pydantic validated it


def test_llamaindex_openai_like_chat_stream_tools_and_structured(server: Any) -> None:
    pytest.importorskip("llama_index.llms.openai_like")
    from llama_index.core.llms import ChatMessage
    from llama_index.core.tools import FunctionTool
    from llama_index.llms.openai_like import OpenAILike
    from pydantic import BaseModel, Field

    def connect(max_tokens: int) -> Any:
        return OpenAILike(
            model="smollm2", api_base=server.url + "/v1", api_key="none", temperature=0, max_tokens=max_tokens,
            is_chat_model=True, is_function_calling_model=True, context_window=8192, max_retries=0,
        )  # fmt: skip

    llm = connect(16)
    messages = [ChatMessage(role="user", content="What is the capital of France?")]
    answer = llm.chat(messages).message.content
    assert isinstance(answer, str) and answer
    assert "".join(r.delta or "" for r in llm.stream_chat(messages)) == answer
    llm = connect(40)  # the shortest call needs 23 tokens: a smaller budget is refused with that number
    tools = [FunctionTool.from_defaults(fn=add), FunctionTool.from_defaults(fn=get_weather)]
    response = llm.chat_with_tools(tools, user_msg="Add 2 and 3.", tool_required=True)
    selections = llm.get_tool_calls_from_response(response, error_on_no_tool_call=True)
    assert selections and all(s.tool_name in ("add", "get_weather") for s in selections)
    for s in selections:
        tool = next(t for t in tools if t.metadata.name == s.tool_name)
        assert tool.call(**s.tool_kwargs).raw_output  # the arguments fit the function

    class Answer(BaseModel):
        city: str = Field(max_length=30)
        sure: bool

    from llama_index.core.prompts import PromptTemplate

    out = llm.structured_predict(
        Answer, PromptTemplate("Which city is the capital of {country}?"), country="France"
    )
    assert isinstance(out, Answer)
