"""OpenAI tool calling on the request side: `tools`, `tool_choice` and `parallel_tool_calls`
read and checked, the tools shown to the model, and the constraint that makes it call one.

- `tool_choice: "auto"` (the default with tools): the model decides; its output is parsed for
  calls (`orchestrator.tool_parser`).
- `"required"`, or `{"type": "function", "function": {"name": ...}}`: the output is held by a
  structural-tag grammar to calls in the model's format, each call's arguments to its tool's
  `parameters` schema (a named tool: exactly one call of it).
- `"none"`: the tools are neither shown nor parsed for; the output is text.

The model sees the tools through its chat template (`tools=`); a template that does not read
them gets them in a system message instead (`tool_prompt`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator.request_fields import Fields, RequestError
from orchestrator.sampling_request import check_output_constraint
from orchestrator.tokenizer import Tokenizer
from orchestrator.tool_parser import CALLS_BEGIN, CALLS_END, MARKERS, ToolCallFormat
from workers.engine.grammar import json_schema_ebnf
from workers.engine.messages import OutputConstraint

_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_MARKER_SPLIT = re.compile("(" + "|".join(map(re.escape, MARKERS)) + ")")
MAX_TOOLS = 128
CHOICES = ("none", "auto", "required")


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any] | None  # a JSON schema of the arguments

    def openai(self) -> dict[str, Any]:
        """The tool as the request gave it (what chat templates expect)."""
        function: dict[str, Any] = {"name": self.name, "description": self.description}
        if self.parameters is not None:
            function["parameters"] = self.parameters
        return {"type": "function", "function": function}

    @property
    def schema(self) -> dict[str, Any]:
        return self.parameters if self.parameters is not None else {"type": "object"}


@dataclass(frozen=True)
class ToolRequest:
    tools: tuple[Tool, ...]
    choice: str  # one of CHOICES
    forced: str | None  # the tool named by `tool_choice`, which must be called (once)
    parallel: bool  # several calls allowed in one answer

    @property
    def active(self) -> bool:
        """The tools are shown to the model and its output is parsed for calls."""
        return self.choice != "none" and bool(self.tools)

    @property
    def constrained(self) -> bool:
        return self.choice == "required" or self.forced is not None


def read_tools(f: Fields) -> ToolRequest | None:
    """The request's tools and choice; None when it gives no tools (a `tool_choice` other than
    "none" is then refused: there is nothing to call)."""
    parallel = f.get_bool("parallel_tool_calls", True)
    raw = f.obj.get("tools")
    if raw is None or raw == []:
        choice = f.obj.get("tool_choice")
        if choice not in (None, "none", "auto"):
            raise f.fail("tool_choice", "needs tools to choose from")
        return None
    if not isinstance(raw, list):
        raise f.fail("tools", "expected a list of tools")
    if len(raw) > MAX_TOOLS:
        raise f.fail("tools", f"at most {MAX_TOOLS} tools, got {len(raw)}")
    tools = tuple(_tool(raw[i], i) for i in range(len(raw)))
    names = [t.name for t in tools]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise RequestError(f"tools[{i}].function.name: {name!r} is given twice", "tools")
    choice, forced = _choice(f, names)
    return ToolRequest(tools, choice, forced, parallel)


def _tool(raw: Any, index: int) -> Tool:
    f = Fields(raw, f"tools[{index}].")
    kind = f.get_str("type")
    if kind != "function":
        raise f.fail("type", f"only function tools are supported, got {kind!r}")
    fn = Fields(raw.get("function"), f"tools[{index}].function.")
    name = fn.get_str("name")
    if name is None or not _NAME.match(name):
        raise fn.fail("name", "expected 1 to 64 letters, digits, '_', '-' or '.'")
    params = fn.obj.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise fn.fail("parameters", "expected a JSON schema object")
    return Tool(name, fn.get_str("description") or "", params)


def _choice(f: Fields, names: Sequence[str]) -> tuple[str, str | None]:
    raw = f.obj.get("tool_choice")
    if raw is None:
        return "auto", None
    if isinstance(raw, str):
        if raw not in CHOICES:
            raise f.fail("tool_choice", f"expected one of {', '.join(CHOICES)}, got {raw!r}")
        return raw, None
    c = Fields(raw, "tool_choice.")
    if c.get_str("type") != "function":
        raise c.fail("type", "expected 'function'")
    name = Fields(raw.get("function"), "tool_choice.function.").get_str("name")
    if name not in names:
        raise f.fail("tool_choice", f"names {name!r}, which is not among the tools")
    return "required", name


def tool_constraint(
    req: ToolRequest, fmt: ToolCallFormat, marker_ids: Mapping[str, int] | None = None
) -> OutputConstraint | None:
    """For a required or named tool choice, the grammar of its output: `CALLS_BEGIN`, one or
    more calls (one when not parallel or named) of the allowed tools with arguments that fit
    their schemas (compact JSON), `CALLS_END`. `marker_ids`: the markers that are single
    tokens of the vocabulary, which the output then must use (a model writes them so; spelled
    out in pieces they would be text it never saw). A schema xgrammar refuses is a 400."""
    if not req.active or not req.constrained:
        return None
    ids = marker_ids or {}

    def text(s: str) -> list[dict[str, Any]]:
        """`s` as elements: each marker that is a token as that token, the rest as strings."""
        parts = [p for p in _MARKER_SPLIT.split(s) if p]
        return [
            {"type": "token", "token": ids[p]} if p in ids else {"type": "const_string", "value": p}
            for p in parts
        ]

    calls: list[dict[str, Any]] = []
    for i, t in enumerate(req.tools):
        if req.forced not in (None, t.name):
            continue
        try:
            arguments = json_schema_ebnf(json.dumps(t.schema))
        except ValueError as e:
            message = str(e).removeprefix("json_schema: ")
            raise RequestError(
                f"tools[{i}].function.parameters: invalid JSON schema: {message}", "tools"
            ) from None
        elements: list[dict[str, Any]] = [
            *text(fmt.call_prefix(t.name)),
            {"type": "grammar", "grammar": arguments},
            *text(fmt.args_end),
        ]
        calls.append({"type": "sequence", "elements": elements})
    call: dict[str, Any] = calls[0] if len(calls) == 1 else {"type": "or", "elements": calls}
    body = [call]
    if req.forced is None and req.parallel:
        more = {"type": "sequence", "elements": [*text(fmt.separator), call]}
        body.append({"type": "star", "content": more if fmt.separator else call})
    spec: dict[str, Any] = {
        "type": "structural_tag",
        "format": {"type": "sequence", "elements": [*text(CALLS_BEGIN), *body, *text(CALLS_END)]},
    }
    constraint = OutputConstraint("structural_tag", json.dumps(spec, ensure_ascii=False))
    return check_output_constraint(Fields({}), "tools", constraint)


def tool_prompt(tools: Sequence[Tool], fmt: ToolCallFormat, parallel: bool) -> str:
    """The tools and how to call them, for a chat template that does not show tools."""
    example = fmt.render([("NAME", '{"ARGUMENT": "VALUE"}')])
    lines = [
        "## Tools",
        "",
        "You can call the functions below. To call one, answer with exactly:",
        example,
    ]
    if parallel:
        lines.append(
            "To call several at once, put one call after another inside "
            f"{CALLS_BEGIN}...{CALLS_END}."
        )
    for t in tools:
        lines += ["", f"### {t.name}"]
        if t.description:
            lines.append(t.description)
        lines.append("Parameters: " + json.dumps(t.schema, ensure_ascii=False))
    return "\n".join(lines)


def with_tool_prompt(messages: list[dict[str, Any]], prompt: str) -> list[dict[str, Any]]:
    """`messages` with `prompt` added to the first system message (or as one, first)."""
    for i, m in enumerate(messages):
        if m["role"] == "system":
            joined = {**m, "content": f"{m['content']}\n\n{prompt}" if m["content"] else prompt}
            return [*messages[:i], joined, *messages[i + 1 :]]
    return [{"role": "system", "content": prompt}, *messages]


def chat_prompt(
    tokenizer: Tokenizer,
    messages: list[dict[str, Any]],
    tools: ToolRequest | None,
    fmt: ToolCallFormat,
    add_generation_prompt: bool = True,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """The prompt text of a chat: its messages through the chat template (with the variables
    `extra`), the tools shown by the template when it reads them, else in a system message.
    Raises ChatTemplateError."""
    extra = dict(extra or {})
    if tools is not None and tools.active:
        if tokenizer.renders_tools:
            extra["tools"] = [t.openai() for t in tools.tools]
        else:
            messages = with_tool_prompt(messages, tool_prompt(tools.tools, fmt, tools.parallel))
    return tokenizer.apply_chat_template(messages, add_generation_prompt, extra)
