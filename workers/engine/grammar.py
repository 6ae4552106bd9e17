"""Structured output: a request's output held to a JSON schema, any JSON object, a regular
expression, an EBNF grammar or a structural tag (xgrammar's format of tagged segments, which
tool calling uses), with xgrammar.

A rank compiles each constraint once against its vocabulary (`GrammarBackend.compile`: cached,
so the actor thread that validates a request pays for it and the loop thread finds it ready);
each constrained request gets its own matcher (`Matcher`), which says before every step which
tokens may come next (a bitmask over the vocabulary, applied to the logits: every other token
gets -inf) and takes the token drawn. When the constraint is complete and nothing more may
follow, the matcher is terminated and the request stops. On a disaggregated pair both ranks
build a matcher: the prefill rank's draws the first token, the decode rank's takes that token
when it arrives with the KV and goes on from there.

xgrammar (and with it torch and transformers) is imported on first use only, so the router
starts fast; without it a constrained request is refused with a message saying so.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.engine.messages import OutputConstraint

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# A JSON value is written compactly (no whitespace between tokens beyond the separators
# below): a model cannot wander off into whitespace without end, and the output is the same
# JSON. xgrammar's default would allow any amount of whitespace.
_JSON_OPTIONS: dict[str, Any] = {"any_whitespace": False, "separators": (", ", ": ")}
JSON_OBJECT_SCHEMA = '{"type": "object"}'  # what `json_object` is: any JSON object
# xgrammar (0.2.x) writes a string with a length bound (`maxLength`, `minLength`) as a run of
# this character class, which lets raw control characters (U+0000-U+001F but CR and LF)
# through: the output would not be JSON (`json.loads` refuses it). Its own unbounded strings
# exclude them; a JSON schema's grammar is rewritten with the same class before it compiles.
_BOUNDED_STRING_CHAR = r"[^\"\\\r\n]"
_JSON_STRING_CHAR = r"[^\0-\x1f\"\\]"
# Per kind but `json_schema` (`_json_schema_grammar`; `json_object` is one): xgrammar's parser
# (no vocabulary) and its compiler method (against the vocabulary).
_PARSE = {
    "regex": "from_regex",
    "ebnf": "from_ebnf",
    "structural_tag": "from_structural_tag",
}
_COMPILE = {
    "regex": "compile_regex",
    "ebnf": "compile_grammar",
    "structural_tag": "compile_structural_tag",
}
_CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: .*? is false: )?")


def xgrammar_available() -> bool:
    try:
        import xgrammar  # noqa: F401
    except ImportError:
        return False
    return True


def _xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError as e:
        raise ValueError(
            "structured output (json_schema, regex, ebnf, response_format) needs the xgrammar "
            "package, which is not installed on this rank"
        ) from e
    return xgrammar


def _message(error: Exception) -> str:
    """xgrammar's error without its C++ source location."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return _CPP_PREFIX.sub("", first)


@functools.lru_cache(maxsize=256)  # a client sends the same schema with every request
def check_constraint(constraint: OutputConstraint) -> None:
    """Parse the constraint without the model's vocabulary (fast: the router checks every
    request with it); raise ValueError naming its kind when it is not valid, or when no
    output can match it (`root ::= root`, the regex `[^\\s\\S]`): such a request would only
    fail at its first token."""
    depth = _nesting(constraint)
    if depth > MAX_NESTING:  # (xgrammar's parse takes time cubic in it, and recurses in C++)
        raise ValueError(
            f"{constraint.kind}: nested {depth} levels deep, more than the {MAX_NESTING} taken"
        )
    grammar = _build(_xgrammar().Grammar, _PARSE, constraint)
    if constraint.kind == "json_schema" and _has_all_of(json.loads(constraint.spec)):
        raise ValueError(
            "json_schema: 'allOf' with several schemas is not supported (the output would not "
            "be held to all of them); merge them into one schema"
        )
    if not _can_start(grammar):
        raise ValueError(f"{constraint.kind}: no output can match it (its language is empty)")


# The deepest nesting a constraint may have: of a JSON schema's (or structural tag's) objects
# and arrays, and of the groups of a regular expression (its `pattern`s too) or an EBNF
# grammar. A JSON schema 64 levels deep (arrays of arrays; objects' `properties` take two a
# level) is checked in about 20 ms, 300 levels in seconds.
MAX_NESTING = 64


def _nesting(constraint: OutputConstraint) -> int:
    """How deep `constraint` nests (see `MAX_NESTING`); RecursionError for JSON nested past
    Python's own limit."""
    if constraint.kind == "regex":
        return _group_depth(constraint.spec)
    if constraint.kind == "ebnf":
        return _group_depth(constraint.spec, quoted=True)
    try:
        parsed = json.loads(constraint.spec or "{}")
    except json.JSONDecodeError:
        return 0  # not JSON: xgrammar says what is wrong with it
    most, stack = 0, [(parsed, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            stack += [(v, depth + 1) for v in value.values()]
        elif isinstance(value, list):
            stack += [(v, depth + 1) for v in value]
        elif isinstance(value, str):  # a `pattern` is a regex; other strings nest nothing
            depth += _group_depth(value)
        most = max(most, depth)
    return most


def _group_depth(text: str, quoted: bool = False) -> int:
    """How deep `(...)` groups nest in a regex (or, `quoted`, an EBNF grammar: its
    "literals" skipped): escaped characters and `[...]` classes hold none; a group left open
    counts until the text ends."""
    depth = most = 0
    i, n = 0, len(text)
    in_class = in_quote = False
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if in_quote:
            in_quote = c != '"'
        elif in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
        elif c == '"' and quoted:
            in_quote = True
        elif c == "(":
            depth += 1
            most = max(most, depth)
        elif c == ")" and depth:
            depth -= 1
        i += 1
    return most


def _has_all_of(schema: Any) -> bool:
    """Whether `schema` (parsed JSON) has an `allOf` of more than one schema anywhere."""
    if isinstance(schema, dict):
        all_of = schema.get("allOf")
        if isinstance(all_of, list) and len(all_of) > 1:
            return True
        return any(_has_all_of(v) for v in schema.values())
    if isinstance(schema, list):
        return any(_has_all_of(v) for v in schema)
    return False


@functools.lru_cache(maxsize=1)
def _byte_compiler() -> Any:
    """A compiler over a vocabulary of the 256 bytes and an end token: every text is a string
    of it, so a grammar that allows none of its tokens first allows no text at all."""
    xgr = _xgrammar()
    vocab = [bytes([b]) for b in range(256)] + [b"<end>"]
    info = xgr.TokenizerInfo(
        vocab, vocab_type=xgr.VocabType.RAW, vocab_size=len(vocab), stop_token_ids=[256]
    )
    return xgr.GrammarCompiler(info, max_threads=1)


def _can_start(grammar: Any) -> bool:
    """Whether some output (the empty one included) matches `grammar` (~0.1-1 ms). A grammar
    that names the model's own tokens (tool-call markers) does not compile over bytes: it is
    given the benefit of the doubt."""
    xgr = _xgrammar()
    try:
        compiled = _byte_compiler().compile_grammar(grammar)
    except Exception:
        return True
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, 257)
    matcher.fill_next_token_bitmask(bitmask)
    return bool(bitmask.any())


@functools.lru_cache(maxsize=256)
def constraint_ebnf(constraint: OutputConstraint) -> str:
    """The constraint's grammar in EBNF (JSON written compactly, as for `json_schema`), for
    embedding in a structural tag; ValueError when xgrammar refuses it. Cached: a client
    sends the same tools with every request."""
    return str(_build(_xgrammar().Grammar, _PARSE, constraint))


def json_schema_ebnf(schema: str) -> str:
    """The grammar of JSON that fits `schema`, in EBNF (see `constraint_ebnf`)."""
    return constraint_ebnf(OutputConstraint("json_schema", schema))


def _build(maker: Any, methods: dict[str, str], constraint: OutputConstraint) -> Any:
    """`constraint` made by `maker`'s method for its kind; ValueError naming the kind when
    xgrammar refuses it."""
    kind, spec = constraint
    if kind == "json_object":
        kind, spec = "json_schema", JSON_OBJECT_SCHEMA
    if kind != "json_schema" and kind not in methods:
        raise ValueError(f"unknown constraint kind {kind!r}")
    try:
        if kind == "json_schema":
            grammar = _json_schema_grammar(spec)
            return grammar if methods is _PARSE else maker.compile_grammar(grammar)
        return getattr(maker, methods[kind])(spec)
    except (RuntimeError, ValueError, TypeError) as e:
        raise ValueError(f"{constraint.kind}: {_message(e)}") from e


def _json_schema_grammar(schema: str) -> Any:
    """The grammar of compact JSON that fits `schema`, its length-bounded strings rewritten to
    refuse raw control characters (`_BOUNDED_STRING_CHAR`)."""
    xgr = _xgrammar()
    text = str(xgr.Grammar.from_json_schema(schema, **_JSON_OPTIONS))
    return xgr.Grammar.from_ebnf(text.replace(_BOUNDED_STRING_CHAR, _JSON_STRING_CHAR))


class Matcher:
    """One request's place in its constraint. `held_back`: end tokens (EOS of a request that
    ignores it) drawn only when the constraint allows nothing else."""

    def __init__(self, matcher: Any, held_back: Sequence[int] = ()):
        self._matcher = matcher
        self.held_back = list(held_back)

    def accept(self, token: int) -> bool:
        """Take the token drawn (False: the constraint does not allow it)."""
        return bool(self._matcher.accept_token(token))

    @property
    def terminated(self) -> bool:
        """The constraint is complete and allows nothing more: the request is done."""
        return bool(self._matcher.is_terminated())

    def fill(self, bitmask: torch.Tensor, row: int, guesses: Sequence[int] = ()) -> None:
        """Mark in `bitmask` what may come next at `row`, and at each following row what may
        come after the guessed tokens before it (speculative decoding), walking the guesses
        and back. Rows past a guess the constraint refuses stay unmarked (all allowed): the
        row before it cannot choose that guess, so no later row's choice is kept."""
        self._matcher.fill_next_token_bitmask(bitmask, row)
        walked = 0
        for token in guesses:
            if self._matcher.is_terminated() or not self._matcher.accept_token(token):
                break
            walked += 1
            if self._matcher.is_terminated():
                break
            self._matcher.fill_next_token_bitmask(bitmask, row + walked)
        if walked:
            self._matcher.rollback(walked)

    def forced_tokens(self) -> list[int]:
        """Tokens spelling the text the constraint forces next (the keys and punctuation of a
        JSON schema, a regex's literal), [] where it leaves a choice: guesses for speculative
        decoding, which the model's own constrained choices then confirm or not."""
        return list(self._matcher.find_jump_forward_tokens())


class GrammarBackend:
    """A rank's compiler for constraints over its model's vocabulary (built on first use:
    the tokenizer of `model_dir`, `vocab_size` logits wide)."""

    def __init__(self, model_dir: str | Path, vocab_size: int, eos_token_ids: Sequence[int]):
        self.model_dir = Path(model_dir)
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self._compiler: Any = None
        self._lock = threading.Lock()

    @property
    def ready(self) -> bool:
        """Whether the compiler is built (constraints compile without a wait for it)."""
        return self._compiler is not None

    def preload(self) -> None:
        """Build the compiler now (a rank does, before it reports ready). Without xgrammar or
        a tokenizer nothing happens: a constrained request is then refused saying why."""
        try:
            self._get_compiler()
        except ValueError as e:
            logger.info("structured output unavailable: %s", e)

    def _get_compiler(self) -> Any:
        with self._lock:
            if self._compiler is None:
                start = time.monotonic()
                xgr = _xgrammar()
                from transformers import AutoTokenizer

                try:
                    tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
                except (OSError, ValueError) as e:
                    raise ValueError(
                        f"structured output needs the model's tokenizer, which could not be "
                        f"loaded from {self.model_dir}: {e}"
                    ) from e
                info = xgr.TokenizerInfo.from_huggingface(
                    tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.eos_token_ids
                )
                self._compiler = xgr.GrammarCompiler(info, max_threads=2)
                logger.info(
                    "structured output ready (%d tokens) in %.1f s",
                    info.vocab_size, time.monotonic() - start,
                )  # fmt: skip
            return self._compiler

    def compile(self, constraint: OutputConstraint) -> Any:
        """The compiled constraint (xgrammar caches it: the same one again costs nothing).
        Raises ValueError naming the constraint's kind when it is not valid."""
        return _build(self._get_compiler(), _COMPILE, constraint)

    def matcher(
        self, constraint: OutputConstraint, stop_token_ids: Sequence[int], ignore_eos: bool
    ) -> Matcher:
        """A fresh matcher for one request. Once the constraint is complete the output may
        end with the request's stop tokens or EOS; with `ignore_eos` EOS comes only when the
        constraint allows nothing more (the output goes on as long as it may)."""
        xgr = _xgrammar()
        stop = sorted({*stop_token_ids, *self.eos_token_ids})
        matcher = xgr.GrammarMatcher(self.compile(constraint), override_stop_tokens=stop)
        held_back = [t for t in self.eos_token_ids if t not in stop_token_ids] if ignore_eos else []
        return Matcher(matcher, held_back)

    def mask(
        self,
        logits: torch.Tensor,  # [S, vocab] float32, written in place
        runs: Sequence[tuple[int, Matcher, Sequence[int]]],  # (first row, matcher, guesses)
        fallback: torch.Tensor | None = None,  # [S, vocab]: unadjusted logits, see below
    ) -> None:
        """Give every token a row's constraint does not allow next -inf. A request's rows
        are its first row and one more per guessed token (`Matcher.fill`). A row left with
        no token at all (its other adjustments, such as a minimum length banning EOS, forbade
        what the constraint allows) takes the masked `fallback` row instead: the constraint
        wins. A matcher's `held_back` tokens stay only where nothing else is left."""
        import torch

        xgr = _xgrammar()
        bitmask = xgr.allocate_token_bitmask(logits.shape[0], self.vocab_size)  # all allowed
        for first, matcher, guesses in runs:
            matcher.fill(bitmask, first, guesses)
        matchers = [(first + i, m) for first, m, guesses in runs for i in range(len(guesses) + 1)]
        rows = [row for row, _ in matchers]
        device_mask = bitmask.to(logits.device)
        xgr.apply_token_bitmask_inplace(logits, device_mask, indices=rows)
        if fallback is not None:
            index = torch.tensor(rows, device=logits.device)
            empty = torch.isneginf(logits.index_select(0, index)).all(dim=-1).tolist()
            redo = [row for row, is_empty in zip(rows, empty, strict=True) if is_empty]
            if redo:
                logits[redo] = fallback[redo]
                xgr.apply_token_bitmask_inplace(logits, device_mask, indices=redo)
        groups: dict[tuple[int, ...], list[int]] = {}
        for row, matcher in matchers:
            if matcher.held_back:
                groups.setdefault(tuple(matcher.held_back), []).append(row)
        for held, held_rows in groups.items():
            index = torch.tensor(held_rows, device=logits.device)
            cols = torch.tensor(held, device=logits.device)
            block = logits.index_select(0, index)
            kept = block[:, cols]
            block[:, cols] = float("-inf")
            nothing_else = torch.isneginf(block).all(dim=-1, keepdim=True)
            block[:, cols] = torch.where(nothing_else, kept, block[:, cols])
            logits[index] = block
