"""A chat answer's text read into OpenAI's parts: `reasoning_content` (a thinking model's block,
`orchestrator.reasoning`), `content`, and `tool_calls` (`orchestrator.tool_parser`), streamed
or whole. Tool calls are read from the answer only, never from the reasoning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from orchestrator.reasoning import ReasoningParser
from orchestrator.tool_parser import ToolCall, ToolCallFormat, ToolCallParser, parse_tool_calls


@dataclass(frozen=True)
class ChatOutputSpec:
    """How one chat's output is read."""

    tool_format: ToolCallFormat | None = None  # None: not parsed for tool calls
    parallel_tool_calls: bool = True
    reasoning: bool = False  # split off the thinking block
    reasoning_open: bool = False  # the prompt opened it: the output starts inside

    @property
    def plain(self) -> bool:
        """The output is content as it is."""
        return self.tool_format is None and not self.reasoning


class ChatDelta(NamedTuple):
    reasoning: str
    content: str
    tool_calls: list[dict[str, Any]]  # OpenAI's tool-call deltas


class ChatOutputParser:
    """One choice's stream of text → `ChatDelta`s."""

    def __init__(self, spec: ChatOutputSpec):
        self._reasoning = ReasoningParser(spec.reasoning_open) if spec.reasoning else None
        self._tools = (
            ToolCallParser(spec.tool_format, spec.parallel_tool_calls)
            if spec.tool_format is not None
            else None
        )

    @property
    def called(self) -> bool:
        """Some tool call has ended."""
        return self._tools is not None and bool(self._tools.tool_calls)

    def feed(self, text: str, final: bool = False) -> ChatDelta:
        """The parts `text` adds; `final`: it is the last of the output (nothing is held)."""
        reasoning, content = "", text
        if self._reasoning is not None:
            split = self._reasoning.feed(text)
            reasoning, content = split
            if final:
                end = self._reasoning.finish()
                reasoning, content = reasoning + end.reasoning, content + end.content
        calls: list[dict[str, Any]] = []
        if self._tools is not None:
            parsed = self._tools.feed(content)
            content, calls = parsed.content, parsed.tool_calls
            if final:
                end_parsed = self._tools.finish()
                content += end_parsed.content
                calls = [*calls, *end_parsed.tool_calls]
        return ChatDelta(reasoning, content, calls)


class ChatOutput(NamedTuple):
    """A whole answer, read."""

    reasoning: str | None  # None when not split off
    content: str  # a tool call that never ended is kept here as written
    tool_calls: list[ToolCall]


def read_chat_output(spec: ChatOutputSpec, text: str) -> ChatOutput:
    """A whole answer's reasoning, content and tool calls, as `spec` says to read them."""
    reasoning: str | None = None
    if spec.reasoning:
        parser = ReasoningParser(spec.reasoning_open)
        first, end = parser.feed(text), parser.finish()
        reasoning, text = first.reasoning + end.reasoning, first.content + end.content
    if spec.tool_format is None:
        return ChatOutput(reasoning, text, [])
    content, calls = parse_tool_calls(spec.tool_format, text, spec.parallel_tool_calls)
    return ChatOutput(reasoning, content, calls)
