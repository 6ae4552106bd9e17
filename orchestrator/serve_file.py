"""`pdserve serve --config FILE`: the `serve` flags in a YAML file, and command-line flags over it.

The file (example: deploy/serve.yaml) holds one key per `serve` flag, named like the flag's
argparse dest (`--prefill-dp` is `prefill_dp`), at the top level or inside a section that only
groups keys (`topology`, `transfer`, `engine`, `eplb`, `requests`). The schema,
orchestrator/serve.schema.json, lists every key with its type and allowed values; a key whose name
differs from its dest says so with `x-dest` (`transfer.timeout` is `transfer_timeout`). Keys
marked `x-env` hold the *name* of an environment variable, read at load time:
`admin_token_env: PDSERVE_ADMIN_TOKEN` sets `admin_token` to that variable's value (None when it
is unset or empty), so that the token itself never sits in the file. Keys marked `x-path` have a
leading `~` expanded; relative paths stay relative to the working directory, as with the flags.

- `load_serve_file(path)` parses and validates the file and returns `{dest: value}`, values typed
  as argparse would give them (a `number` key's 2 becomes 2.0, an `integer` key's 2.0 becomes 2;
  2.5 there is refused). A file that is not UTF-8 YAML, or a wrong key, type or value, is a
  `ValueError` naming the file, the key's path and what is allowed.
- `merge_serve_args(args, parser, argv)` applies the file named by `args.config` to the parsed
  `args`: an option given on the command line keeps its value, every other option the file sets
  takes the file's value, and options the file leaves out keep their defaults. Which options were
  given is found by parsing `argv` again with a copy of `parser` whose every default is a sentinel:
  an option whose value is not the sentinel was on the command line (`--page-size 16` counts as
  given even though 16 is the default). A flag given from a mutually exclusive group also drops
  the file's values for the group's other flags (`--kv-memory-fraction` on the command line beats
  `kv_capacity_tokens` in the file). Flags that only switch on (`--colocated`) can be turned on by
  the command line but not off.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from collections.abc import Hashable, Iterator, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).resolve().parent / "serve.schema.json"


@cache
def serve_schema() -> dict[str, Any]:
    """orchestrator/serve.schema.json, read once."""
    try:
        return json.loads(SCHEMA_PATH.read_text())
    except FileNotFoundError:
        raise ValueError(
            f"{SCHEMA_PATH} is missing: this pdserve installation is incomplete (the schema "
            "ships as package data of `orchestrator`); reinstall pdserve"
        ) from None


def load_serve_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The settings of a serve file as `{argparse dest of the `serve` flag: value}`."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_UniqueKeyLoader)
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    schema = serve_schema()
    errors = sorted(
        jsonschema.Draft202012Validator(schema).iter_errors(data),
        key=lambda e: [str(p) for p in e.absolute_path],
    )
    if errors:
        raise ValueError("\n".join(f"{path}: {line}" for e in errors for line in _explain(e)))
    return dict(_flatten(data, schema))


def merge_serve_args(
    args: argparse.Namespace, parser: argparse.ArgumentParser, argv: Sequence[str] | None = None
) -> argparse.Namespace:
    """`args` (from `parser.parse_args(argv)`) with the serve file `args.config` applied under the
    command line (see the module doc); `args` itself as it is when there is no `config`. `parser`
    is the top-level `pdserve` parser or the `serve` subparser, whichever parsed `argv`
    (default: `sys.argv[1:]`)."""
    path = getattr(args, "config", None)
    if path is None:
        return args
    values = load_serve_file(path)
    unknown = sorted(set(values) - set(vars(args)))
    if unknown:
        raise ValueError(
            f"{path}: sets {', '.join(unknown)}, which this `pdserve serve` has no flag for"
        )
    given = explicit_dests(parser, sys.argv[1:] if argv is None else argv)
    overridden = set(given)
    for group in _exclusive_groups(parser):
        dests = {a.dest for a in group._group_actions}
        if dests & given:
            overridden |= dests
    merged = argparse.Namespace(**vars(args))
    for dest, value in values.items():
        if dest not in overridden:
            setattr(merged, dest, value)
    return merged


def explicit_dests(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The dests of the options that `argv` gives explicitly (with any value, the default too)."""
    probe = copy.deepcopy(parser)
    for p in _parsers(probe):
        for action in p._actions:
            if action.dest != argparse.SUPPRESS:
                action.default = _UNSET
        p._defaults = dict.fromkeys(p._defaults, _UNSET)
    namespace, _ = probe.parse_known_args(list(argv))
    return {dest for dest, value in vars(namespace).items() if value is not _UNSET}


# ---- helpers ------------------------------------------------------------------------------------

_UNSET = object()  # a default no command line can produce


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # SafeLoader's own error below names it
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _flatten(data: dict[str, Any], schema: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    for key, value in data.items():
        prop = schema["properties"][key]
        if prop.get("type") == "object":
            yield from _flatten(value, prop)
        else:
            yield prop.get("x-dest", key), _convert(value, prop)


def _convert(value: Any, prop: dict[str, Any]) -> Any:
    if value is None:
        return None
    if prop.get("x-env"):
        return os.environ.get(value) or None
    if prop.get("x-path"):
        return os.path.expanduser(value)
    if "number" in _types(prop) and isinstance(value, int):
        return float(value)
    if "integer" in _types(prop) and isinstance(value, float):
        return int(value)  # 16.0: JSON Schema counts it an integer, but range(16.0) fails
    return value


def _types(prop: dict[str, Any]) -> list[str]:
    t = prop.get("type", [])
    return [t] if isinstance(t, str) else list(t)


_ARTICLE = {"integer": "an integer", "number": "a number", "string": "a string",
            "boolean": "true or false", "object": "a mapping of keys", "null": "null"}  # fmt: skip


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        type(value)
    )
    shown = json.dumps(value, default=str)
    return f"{shown} ({kind})" if kind else shown


def _explain(e: jsonschema.ValidationError) -> Iterator[str]:
    """One line per problem: `key.path: what is wrong; what is allowed`."""
    where = ".".join(str(p) for p in e.absolute_path)
    at = f"{where}: " if where else ""
    if e.validator == "additionalProperties":
        known = list(e.schema.get("properties", {}))
        for key in sorted(set(e.instance) - set(known), key=str):
            yield f"{where + '.' if where else ''}{key}: unknown key; known: {', '.join(known)}"
        return
    if e.validator == "type":
        allowed = " or ".join(_ARTICLE.get(t, t) for t in _types(e.schema))
        yield f"{where or 'top level'}: expected {allowed}, got {_describe(e.instance)}{_flag(e)}"
        return
    if e.validator == "enum":
        options = ", ".join(str(v) for v in e.validator_value)
        yield f"{at}must be one of {options}; got {_describe(e.instance)}{_flag(e)}"
        return
    bounds = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}
    if e.validator in bounds:
        yield f"{at}must be {bounds[str(e.validator)]} {e.validator_value}, got {e.instance}{_flag(e)}"
    elif e.validator == "minLength":
        yield f"{at}must not be empty{_flag(e)}"
    elif e.validator == "pattern":
        yield f"{at}must match {e.validator_value}, got {_describe(e.instance)}{_flag(e)}"
    elif e.validator == "not":
        yield f"{at}{e.validator_value.get('description', e.message)}"
    else:
        yield f"{at}{e.message}"


def _flag(e: jsonschema.ValidationError) -> str:
    """A key's description (it names the flag), for keys that are not sections."""
    description = e.schema.get("description")
    return f" ({description})" if description and "object" not in _types(e.schema) else ""


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """`parser` and its subcommands' parsers, each once."""
    seen: set[int] = set()
    stack = [parser]
    while stack:
        p = stack.pop()
        if id(p) in seen:
            continue
        seen.add(id(p))
        yield p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                stack.extend(action.choices.values())


def _exclusive_groups(parser: argparse.ArgumentParser) -> Iterator[Any]:
    for p in _parsers(parser):
        yield from p._mutually_exclusive_groups
