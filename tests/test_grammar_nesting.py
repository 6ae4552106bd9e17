"""How deep a constraint nests (`workers.engine.grammar._nesting`), which the router caps
before xgrammar parses it (its parse takes time cubic in the depth, and recurses in C++): a
JSON schema's objects and arrays and its `pattern`s' groups, a regex's and an EBNF grammar's
groups — not brackets inside strings, classes or escapes."""

from __future__ import annotations

import json

import pytest

from workers.engine.grammar import MAX_NESTING, _nesting, check_constraint, xgrammar_available
from workers.engine.messages import OutputConstraint

pytestmark = pytest.mark.timeout(60)


def _arrays(depth: int) -> str:
    return '{"type": "array", "items": ' * depth + '{"type": "object"}' + "}" * depth


def test_what_counts_as_nesting():
    assert _nesting(OutputConstraint("json_schema", _arrays(70))) == 71
    deep_pattern = json.dumps({"type": "string", "pattern": "(" * 70 + "a" + ")" * 70})
    assert _nesting(OutputConstraint("json_schema", deep_pattern)) == 71
    assert _nesting(OutputConstraint("regex", "(" * 80 + "a" + ")" * 80)) == 80
    # Escaped, in a class, or (EBNF) quoted: no group.
    assert _nesting(OutputConstraint("regex", r"\(a\)[(]((b))")) == 2
    assert _nesting(OutputConstraint("ebnf", 'root ::= "(" ( "a" | "(" ) ")"')) == 1
    assert _nesting(OutputConstraint("json_schema", "{not json")) == 0  # xgrammar says why


@pytest.mark.skipif(not xgrammar_available(), reason="needs xgrammar")
def test_a_wide_flat_schema_with_brackets_in_its_strings_is_taken():
    """(Found by a review: counting every bracket in the text refused it, 74 deep.)"""
    props = {f"p{i}": {"type": "string", "pattern": "^[^(]*$", "description": "(see docs"}
             for i in range(70)}  # fmt: skip
    flat = OutputConstraint("json_schema", json.dumps({"type": "object", "properties": props}))
    assert _nesting(flat) <= 4 < MAX_NESTING
    check_constraint(flat)
    with pytest.raises(ValueError, match="nested 71 levels deep"):
        check_constraint(OutputConstraint("json_schema", _arrays(70)))
