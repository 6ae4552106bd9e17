"""Tool calls in a DeepSeek model's output: the formats, and a parser that turns output text
into content and tool calls, as it streams or all at once.

DeepSeek-V3 writes its calls as

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    ARGUMENTS
    ```<｜tool▁call▁end｜>
    <｜tool▁call▁begin｜>...<｜tool▁call▁end｜><｜tool▁calls▁end｜>

and DeepSeek-V3.1 as `<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGUMENTS<｜tool▁call▁end｜>`
inside the same brackets, with nothing between calls. The parser knows where a call's name and
arguments start from the format; the end of the arguments is always `<｜tool▁call▁end｜>` (it
cannot occur inside JSON), so a model that drops the closing fence or a newline still parses.

Pure text in, events out: no tokenizer, no request, no network.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, NamedTuple

CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
CALLS_END = "<｜tool▁calls▁end｜>"
CALL_BEGIN = "<｜tool▁call▁begin｜>"
CALL_END = "<｜tool▁call▁end｜>"
SEP = "<｜tool▁sep｜>"
OUTPUTS_BEGIN = "<｜tool▁outputs▁begin｜>"
OUTPUTS_END = "<｜tool▁outputs▁end｜>"
OUTPUT_BEGIN = "<｜tool▁output▁begin｜>"
OUTPUT_END = "<｜tool▁output▁end｜>"
# Every marker: a tokenizer keeps these in the output text even where they are special tokens.
MARKERS = (
    CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP,
    OUTPUTS_BEGIN, OUTPUTS_END, OUTPUT_BEGIN, OUTPUT_END,
)  # fmt: skip
_MAX_HEAD_CHARS = 512  # a call whose name has not ended by then is not a call


@dataclass(frozen=True)
class ToolCallFormat:
    """How one model family writes a call: `CALL_BEGIN + head + NAME + name_end + ARGUMENTS +
    args_end`, calls joined by `separator`, all inside `CALLS_BEGIN ... CALLS_END`."""

    name: str
    head: str
    name_end: str
    args_end: str  # ends with CALL_END
    separator: str

    def call_prefix(self, function_name: str) -> str:
        """What comes before a call's arguments."""
        return CALL_BEGIN + self.head + function_name + self.name_end

    def render(self, calls: list[tuple[str, str]]) -> str:
        """`(name, arguments)` pairs as the model writes them."""
        parts = [self.call_prefix(name) + args + self.args_end for name, args in calls]
        return CALLS_BEGIN + self.separator.join(parts) + CALLS_END


FORMATS = {
    "deepseek_v3": ToolCallFormat(
        "deepseek_v3", "function" + SEP, "\n```json\n", "\n```" + CALL_END, "\n"
    ),
    "deepseek_v31": ToolCallFormat("deepseek_v31", "", SEP, CALL_END, ""),
}


def detect_format(chat_template: str | None) -> ToolCallFormat:
    """The format a chat template writes past calls in: V3's fenced JSON, or V3.1's bare
    arguments after `<｜tool▁sep｜>`; V3 when the template shows neither."""
    if chat_template and SEP in chat_template and "```json" not in chat_template:
        return FORMATS["deepseek_v31"]
    return FORMATS["deepseek_v3"]


class ToolCall(NamedTuple):
    id: str
    name: str
    arguments: str  # JSON text, as the model wrote it

    def openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


class ParsedDelta(NamedTuple):
    """What a piece of output adds: content text, and OpenAI `tool_calls` deltas (a call's
    first one has its `id`, `type` and `name`; later ones add to its `arguments`)."""

    content: str
    tool_calls: list[dict[str, Any]]


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class _Call:
    id: str
    name: str
    kept: bool  # False: a call past the first when calls are not parallel
    arguments: str = ""
    raw: str = ""  # its text from CALL_BEGIN (CALLS_BEGIN too if first), for one never ended
    complete: bool = False


@dataclass
class ToolCallParser:
    """Splits one output's text into content and calls, piece by piece (`feed`, then
    `finish`). Text that may be the start of a marker is held back until it is known.
    `parallel=False`: calls after the first are dropped (OpenAI's `parallel_tool_calls`)."""

    format: ToolCallFormat
    parallel: bool = True
    calls: list[_Call] = field(default_factory=list)  # the calls kept, ended or not
    _buf: str = ""
    _state: str = "text"  # text | calls | head | args
    _raw: str = ""  # the current call's text so far, while its head is read
    _opening: str = ""  # CALLS_BEGIN, until the first call after it takes it into its `raw`
    _current: _Call | None = None  # the call whose arguments are being read

    @property
    def tool_calls(self) -> list[ToolCall]:
        """The calls that ended, in order."""
        return [ToolCall(c.id, c.name, c.arguments) for c in self.calls if c.complete]

    def feed(self, text: str) -> ParsedDelta:
        self._buf += text
        return self._run(final=False)

    def finish(self) -> ParsedDelta:
        """The output ended: give out what was held back. An unended call's arguments go out
        as they are (the stream already showed its start)."""
        return self._run(final=True)

    def _run(self, final: bool) -> ParsedDelta:
        content: list[str] = []
        deltas: list[dict[str, Any]] = []
        step = {"text": self._text, "calls": self._between, "head": self._head, "args": self._args}
        while step[self._state](final, content, deltas):
            pass
        return ParsedDelta("".join(content), _merge(deltas))

    # Each step consumes what it can of the buffer and says whether to go on.

    def _text(self, final: bool, content: list[str], deltas: list[dict[str, Any]]) -> bool:
        at = _find_any(self._buf, (CALLS_BEGIN, CALL_BEGIN))
        if at is None:
            keep = 0 if final else held_back(self._buf, (CALLS_BEGIN, CALL_BEGIN))
            content.append(self._buf[: len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep :]
            return False
        index, marker = at
        content.append(self._buf[:index])
        # A bare CALL_BEGIN (the brackets left out) opens the calls too.
        self._opening = CALLS_BEGIN if marker == CALLS_BEGIN else ""
        self._buf = self._buf[index + len(self._opening) :]
        self._state = "calls"
        return True

    def _between(self, final: bool, content: list[str], deltas: list[dict[str, Any]]) -> bool:
        rest = self._buf.lstrip()
        if rest.startswith(CALL_BEGIN):
            self._buf = rest[len(CALL_BEGIN) :]
            self._raw = self._opening + CALL_BEGIN
            self._opening = ""
            self._state = "head"
            return True
        if rest.startswith(CALLS_END):
            self._buf = rest[len(CALLS_END) :]
            self._state = "text"
            return True
        if not rest and final:
            self._buf = ""
            return False
        if not final and (CALL_BEGIN.startswith(rest) or CALLS_END.startswith(rest)):
            return False  # empty, or the start of a marker: wait
        self._buf = rest  # text where a call should be: the calls are over
        self._state = "text"
        return True

    def _head(self, final: bool, content: list[str], deltas: list[dict[str, Any]]) -> bool:
        end = self._buf.find(self.format.name_end)
        if end < 0:
            if not final and len(self._buf) < _MAX_HEAD_CHARS:
                return False
            content.append(self._raw + self._buf)  # no name ever came: it was content
            self._buf = ""
            self._state = "text"
            return True
        name = self._buf[:end].rsplit(SEP, 1)[-1].strip()
        end += len(self.format.name_end)
        kept = self.parallel or not self.calls
        call = _Call(new_call_id(), name, kept, raw=self._raw + self._buf[:end])
        self._buf = self._buf[end:]
        self._current = call
        self._state = "args"
        if kept:
            self.calls.append(call)
            deltas.append(
                {
                    "index": len(self.calls) - 1,
                    "id": call.id,
                    "type": "function",
                    "function": {"name": name, "arguments": ""},
                }
            )
        return True

    def _args(self, final: bool, content: list[str], deltas: list[dict[str, Any]]) -> bool:
        call = self._current
        assert call is not None
        end = self._buf.find(CALL_END)
        if end >= 0:
            used = end + len(CALL_END)
            args = self._buf[:end].rstrip()
            fence = self.format.args_end[: -len(CALL_END)].strip()
            if fence and args.endswith(fence):
                args = args[: -len(fence)].rstrip()
            call.complete = True
        elif final:
            used = len(self._buf)
            args = self._buf.rstrip()
        else:
            used = len(self._buf) - _held_args(self._buf)
            args = self._buf[:used]
        if not call.arguments:
            args = args.lstrip()
        call.raw += self._buf[:used]
        call.arguments += args
        self._buf = self._buf[used:]
        if args and call.kept:
            deltas.append({"index": len(self.calls) - 1, "function": {"arguments": args}})
        if call.complete:
            self._current = None
            self._state = "calls"
            return True
        return False


def parse_tool_calls(
    fmt: ToolCallFormat, text: str, parallel: bool = True
) -> tuple[str, list[ToolCall]]:
    """The whole output at once: its content (an unended call kept there as written) and its
    calls."""
    parser = ToolCallParser(fmt, parallel)
    content = parser.feed(text).content + parser.finish().content
    for call in parser.calls:
        if not call.complete:
            content += call.raw
    return content, parser.tool_calls


def _find_any(text: str, markers: tuple[str, ...]) -> tuple[int, str] | None:
    found = [(i, m) for m in markers if (i := text.find(m)) >= 0]
    return min(found) if found else None


def held_back(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that begins one of `markers`."""
    for k in range(min(len(text), max(map(len, markers)) - 1), 0, -1):
        if any(m.startswith(text[-k:]) for m in markers):
            return k
    return 0


def _held_args(text: str) -> int:
    """Length of the end of a call's arguments that may belong to its closing (whitespace, a
    fence's backticks, the start of CALL_END)."""
    keep = held_back(text, (CALL_END,))
    while keep < len(text) and text[len(text) - keep - 1] in " \t\r\n`":
        keep += 1
    return keep


def _merge(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Argument deltas of the same call, one after another, as one."""
    out: list[dict[str, Any]] = []
    for d in deltas:
        prev = out[-1] if out else None
        if prev is not None and prev["index"] == d["index"] and set(d) == {"index", "function"}:
            prev["function"] = {
                **prev["function"],
                "arguments": prev["function"]["arguments"] + d["function"]["arguments"],
            }
        else:
            out.append(d)
    return out
