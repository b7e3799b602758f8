"""Applications on lamina's models: prompt templates, chains, conversation memory, tools and agents.

    from lamina.apps import Agent, LaminaChat, Tool

    def add(a: int, b: int) -> int:
        \"\"\"Add two integers.\"\"\"
        return a + b

    agent = Agent(LaminaChat("smollm2", temperature=0), [add], max_steps=3)
    result = agent.run("What is 2 + 3?")
    result.answer, [o.content for o in result.observations]

Nothing here imports torch until a ``LaminaChat`` is made: templates, chains, memory and the agent loop
work with any model callable (LangChain-style, without a global settings object).
"""

from __future__ import annotations

from lamina.apps.agents import Agent, AgentResult, AgentStep, Observation
from lamina.apps.chains import Chain, Step
from lamina.apps.memory import SummaryMemory, WindowMemory, token_counter
from lamina.apps.models import ChatModel, LaminaChat, Reply
from lamina.apps.prompts import ChatPromptTemplate, FewShotTemplate, PromptTemplate
from lamina.apps.tools import Tool, ToolCall, calls_schema, parse_calls, tool_choice_controls

__all__ = [
    "Agent",
    "AgentResult",
    "AgentStep",
    "Chain",
    "ChatModel",
    "ChatPromptTemplate",
    "FewShotTemplate",
    "LaminaChat",
    "Observation",
    "PromptTemplate",
    "Reply",
    "Step",
    "SummaryMemory",
    "Tool",
    "ToolCall",
    "WindowMemory",
    "calls_schema",
    "parse_calls",
    "token_counter",
    "tool_choice_controls",
]
