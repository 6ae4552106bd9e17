"""Reasoning in a DeepSeek-R1-style output: the thinking between `<think>` and `</think>` comes
apart from the answer, as the chat response's `reasoning_content` and `content`.

A reasoning model's chat template often opens the block itself (R1 ends the prompt with
`<｜Assistant｜><think>\\n`; V3.1 does with `thinking: true` in `chat_template_kwargs`): the
output then starts inside it (`ReasoningParser(open=True)`). Otherwise an output that begins
with `<think>` opens it. The answer's leading blanks (R1 writes `</think>\\n\\n`) are dropped.

The parser is pure text in, text out, like `orchestrator.tool_parser`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import NamedTuple

from orchestrator.tool_parser import held_back
from workers.engine.grammar import constraint_ebnf
from workers.engine.messages import OutputConstraint

THINK_BEGIN = "<think>"
THINK_END = "</think>"
REASONING_PARSERS = ("auto", "none", "deepseek_r1")  # auto: when the chat template thinks


def opens_reasoning(prompt: str) -> bool:
    """Whether the prompt leaves a `<think>` block open for the output."""
    return prompt.rstrip().endswith(THINK_BEGIN)


def template_reasons(chat_template: str | None) -> bool:
    """Whether a chat template knows thinking blocks (R1's, V3.1's)."""
    return chat_template is not None and THINK_BEGIN in chat_template


def after_reasoning(constraint: OutputConstraint) -> OutputConstraint:
    """`constraint` held only after the thinking block: any text up to `</think>` first (for
    a prompt that opened the block), so that the model still thinks before it answers in
    the required shape."""
    if constraint.kind == "structural_tag":
        answer = json.loads(constraint.spec)["format"]
    else:
        answer = {"type": "grammar", "grammar": constraint_ebnf(constraint)}
    thinking = {"type": "tag", "begin": "", "content": {"type": "any_text"}, "end": THINK_END}
    spec = {
        "type": "structural_tag",
        "format": {"type": "sequence", "elements": [thinking, answer]},
    }
    return OutputConstraint("structural_tag", json.dumps(spec, ensure_ascii=False))


class Split(NamedTuple):
    reasoning: str
    content: str


@dataclass
class ReasoningParser:
    """Splits one output's text into reasoning and content, piece by piece (`feed`, then
    `finish`); text that may be the start of a tag is held back until it is known."""

    open: bool = False  # the prompt opened the block: the output starts inside it
    _state: str = "start"  # start | reasoning | content
    _buf: str = ""
    _answer_started: bool = False

    def __post_init__(self) -> None:
        if self.open:
            self._state = "reasoning"

    def feed(self, text: str) -> Split:
        self._buf += text
        return self._run(final=False)

    def finish(self) -> Split:
        return self._run(final=True)

    def _run(self, final: bool) -> Split:
        reasoning: list[str] = []
        content: list[str] = []
        while True:
            if self._state == "start":
                rest = self._buf.lstrip()
                if rest.startswith(THINK_BEGIN):
                    self._buf = rest[len(THINK_BEGIN) :]
                    self._state = "reasoning"
                    continue
                if not final and THINK_BEGIN.startswith(rest):
                    break  # empty, or the start of the tag: wait
                self._state = "content"
                self._answer_started = True  # no block: the text is as written
            elif self._state == "reasoning":
                end = self._buf.find(THINK_END)
                if end >= 0:
                    reasoning.append(self._buf[:end])
                    self._buf = self._buf[end + len(THINK_END) :]
                    self._state = "content"
                    continue
                keep = 0 if final else held_back(self._buf, (THINK_END,))
                reasoning.append(self._buf[: len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep :]
                break
            else:
                if not self._answer_started:
                    self._buf = self._buf.lstrip()
                    self._answer_started = bool(self._buf)
                content.append(self._buf)
                self._buf = ""
                break
        return Split("".join(reasoning), "".join(content))
