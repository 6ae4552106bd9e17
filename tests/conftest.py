"""Session fixtures: one Ray instance, and one server on the tiny model, shared by all tests;
and, per module, that server's generating rank's `info`.

`PDSERVE_TEST_MODEL=/path/to/checkpoint` runs the server tests on another checkpoint dir.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.http_calls import _rank
from tests.watchdog import pytest_runtest_protocol  # noqa: F401 (a hook: ends a hung run)

if not torch.cuda.is_available():
    # The Triton kernels' CPU tests run under the interpreter, which must be chosen before
    # anything imports triton (or workers.kernels).
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A local Ray instance for the whole session (4 logical CPUs, no dashboard)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=8, include_dashboard=False, logging_level=logging.WARNING)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    override = os.environ.get("PDSERVE_TEST_MODEL")
    if override:
        return Path(override)
    from workers.model.tiny import ensure_tiny_checkpoint

    return Path(ensure_tiny_checkpoint())


def tiny_serve_config(model_dir: Path, **overrides: object):  # -> ServeConfig
    """A server config for tests: a free loopback port, and a KV cache of half the context
    length (so that "beyond the KV capacity" is distinct from "beyond the context")."""
    from orchestrator.config import ServeConfig
    from workers.engine.config import EngineConfig

    max_ctx = json.loads((model_dir / "config.json").read_text()).get(
        "max_position_embeddings", 4096
    )
    page_size = 16
    kv_tokens = max(page_size * 8, min(4096, max_ctx // 2) // page_size * page_size)
    # Structured output compiles on first use: most test servers never see a constraint.
    engine = EngineConfig(
        page_size=page_size, kv_capacity_tokens=kv_tokens, device="cpu",
        preload_structured_output=False,
    )  # fmt: skip
    fields: dict[str, object] = {
        "port": 0,
        "engine": engine,
        "log_level": "warning",
        "request_timeout_s": 300.0,
    }
    fields.update(overrides)
    return ServeConfig(**fields)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def launch_tiny(ray_session, tiny_model_dir) -> Callable[..., Any]:
    """`launch_tiny(**serve_config_overrides) -> LocalServer`: a server of one's own (a new
    engine rank); the caller stops it."""
    from orchestrator.launcher import launch

    def start(**overrides: object) -> Any:
        return launch(tiny_serve_config(tiny_model_dir, **overrides), model_dir=tiny_model_dir)

    return start


@pytest.fixture(scope="session")
def tiny_server(launch_tiny) -> Iterator[str]:
    """Base URL (http://127.0.0.1:PORT) of a router + uvicorn serving the tiny model from a
    background thread, with one engine rank actor; shut down at the end of the session."""
    server = launch_tiny()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def info(tiny_server) -> dict[str, Any]:
    """The tiny server's generating rank's `info` (`role`, `vocab_size`, `max_context_len`,
    `kv_capacity_tokens`, ...)."""
    return _rank(tiny_server)["info"]
