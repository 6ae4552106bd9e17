"""Strict reading of a request's JSON fields, and the error every check raises.

Every check raises `RequestError` whose message starts with the offending field's name as the
client wrote it (`sampling_params.temperature`, `max_tokens`, `messages[1].content`), so a 400
says exactly what to fix. Types are strict: `true` is not an integer, `1.5` is not a token count,
`"0.7"` is not a number.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

MAX_STOP_STRINGS = 16
# The router looks for each in the text at every token: a long one costs that on its loop.
MAX_STOP_STRING_CHARS = 4096


class RequestError(Exception):
    """A request the server refuses; becomes `{"error": {"message", "type", "param"}}`."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        status: int = 400,
        type: str = "invalid_request_error",
        code: str | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.type = type
        self.code = code  # finer than `type`, e.g. "context_length_exceeded"

    def body(self) -> dict[str, Any]:
        error = {"message": self.message, "type": self.type, "param": self.param}
        if self.code is not None:
            error["code"] = self.code
        return {"error": error}


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


class Fields:
    """Typed reads from one JSON object; `prefix` makes error names like `sampling_params.x`."""

    def __init__(self, obj: Any, prefix: str = ""):
        if not isinstance(obj, Mapping):
            name = prefix.rstrip(".") or "body"
            raise RequestError(f"{name}: expected a JSON object, got {type_name(obj)}", name)
        self.obj = obj
        self.prefix = prefix

    def name(self, key: str) -> str:
        return self.prefix + key

    def has(self, key: str) -> bool:
        return self.obj.get(key) is not None

    def fail(self, key: str, problem: str) -> RequestError:
        return RequestError(f"{self.name(key)}: {problem}", self.name(key))

    def get_int(self, key: str, default: int | None = None) -> int | None:
        value = self.obj.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"expected an integer, got {type_name(value)} {value!r}")
        return value

    def get_float(self, key: str, default: float) -> float:
        value = self.obj.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, f"expected a number, got {type_name(value)} {value!r}")
        if not math.isfinite(value):
            raise self.fail(key, f"expected a finite number, got {value!r}")
        return float(value)

    def get_bool(self, key: str, default: bool = False) -> bool:
        value = self.obj.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(key, f"expected true or false, got {type_name(value)} {value!r}")
        return value

    def get_str(self, key: str) -> str | None:
        value = self.obj.get(key)
        if value is not None and not isinstance(value, str):
            raise self.fail(key, f"expected a string, got {type_name(value)}")
        return value

    def stop_strings(self, key: str) -> tuple[str, ...]:
        value = self.obj.get(key)
        if value is None:
            return ()
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise self.fail(key, "expected a string or a list of strings")
        if any(not s for s in items):
            raise self.fail(key, "stop strings must not be empty")
        if len(items) > MAX_STOP_STRINGS:
            raise self.fail(key, f"at most {MAX_STOP_STRINGS} stop strings, got {len(items)}")
        if any(len(s) > MAX_STOP_STRING_CHARS for s in items):
            raise self.fail(key, f"stop strings must be at most {MAX_STOP_STRING_CHARS} characters")
        return tuple(items)

    def token_ids(self, key: str) -> list[int] | None:
        value = self.obj.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in value
        ):
            raise self.fail(key, "expected a list of integer token ids")
        return value

    def neutral(self, key: str, *allowed: Any) -> None:
        """Refuse a feature pdserve does not implement unless it is set to a no-op value."""
        value = self.obj.get(key)
        if value is not None and value not in allowed:
            raise self.fail(key, f"{value!r} is not supported (allowed: {allowed!r})")
