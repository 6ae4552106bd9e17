"""What every `pdserve` subcommand shares."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

Command = Callable[[argparse.Namespace], int]


def say(*parts: Any) -> None:
    """A line of the command's own output, marked as pdserve's."""
    print("pdserve:", *parts, flush=True)
