"""Where a checkpoint comes from: a local dir, or a Hugging Face Hub repository.

`--model` takes either. A repository id (`deepseek-ai/DeepSeek-V2-Lite`) is fetched with
`huggingface_hub` into its cache (or `--download-dir`), once per machine: the files a
checkpoint needs (config, safetensors, tokenizer, chat template), not the rest of the repo.
Every machine that serves the model resolves the id itself, so the ranks on other nodes fetch
(or find in their own cache) the same revision; with `HF_HUB_OFFLINE=1`, or without network,
only what the cache holds is used. `HF_TOKEN` reaches gated repositories as usual.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

# What serving needs of a checkpoint repository (DeepSeek's also hold code, papers, figures).
CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$", re.ASCII)


@dataclass(frozen=True)
class CheckpointSource:
    """`--model` as given, and how to fetch it when it names a Hub repository."""

    model: str  # a local dir, or a Hub repository id
    revision: str | None = None  # a branch, tag or commit of the repository (default: main)
    download_dir: str | None = None  # the cache to fetch into (default: huggingface_hub's)

    @property
    def is_hub_repo(self) -> bool:
        """A repository id that is not also a local path."""
        return not Path(self.model).expanduser().exists() and bool(_REPO_ID.match(self.model))


def check_model_arg(source: CheckpointSource) -> None:
    """ValueError unless `source.model` is a checkpoint dir or looks like a repository id
    (whether the repository exists is found out when it is fetched)."""
    if source.is_hub_repo:
        return
    path = Path(source.model).expanduser()
    if not path.exists():
        raise ValueError(
            f"--model {source.model!r}: no such dir, and not a Hugging Face repository id "
            "(ORG/NAME); leave --model out to serve the built-in tiny model"
        )
    if source.revision is not None:
        raise ValueError(f"--revision is for Hub repositories; --model {source.model!r} is a dir")
    if not (path / "config.json").is_file():
        raise ValueError(
            f"--model {source.model!r} is not a Hugging Face checkpoint dir (no config.json); "
            "leave --model out to serve the built-in tiny model"
        )


def checkpoint_dir(source: CheckpointSource, local_dir: str | None = None) -> Path:
    """The checkpoint dir on this machine: `source.model` itself, or the repository's
    snapshot, fetched if the cache lacks it. `local_dir`: where another machine found it,
    used when it exists here too (the same machine, or a shared file system)."""
    if local_dir is not None and (Path(local_dir) / "config.json").is_file():
        return Path(local_dir)
    if not source.is_hub_repo:
        path = Path(source.model).expanduser().resolve()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"checkpoint dir {path} not found on this machine: every node needs the "
                "checkpoint at the same path (a shared file system, or a copy on each)"
            )
        return path
    return _fetch(source)


def _fetch(source: CheckpointSource) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            HFValidationError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as e:  # pragma: no cover - a dependency of pdserve
        raise RuntimeError(
            f"--model {source.model}: fetching from the Hugging Face Hub needs huggingface_hub "
            f"({e}); or give a local checkpoint dir"
        ) from e
    where = f"{source.model}" + (f"@{source.revision}" if source.revision else "")
    logger.info("fetching %s from the Hugging Face Hub (or its cache)", where)
    try:
        path = snapshot_download(
            source.model,
            revision=source.revision,
            cache_dir=source.download_dir,
            allow_patterns=CHECKPOINT_FILES,
        )
    except HFValidationError as e:
        raise ValueError(f"--model {where}: not a valid repository id ({e})") from None
    except LocalEntryNotFoundError:
        raise ValueError(
            f"--model {where}: not in the Hub cache"
            + (f" {source.download_dir}" if source.download_dir else "")
            + " and the Hugging Face Hub cannot be reached (offline, HF_HUB_OFFLINE=1, or no "
            "network); fetch it where there is network, or give a local checkpoint dir"
        ) from None
    except GatedRepoError:
        raise ValueError(
            f"--model {where}: a gated repository; accept its terms on huggingface.co and set "
            "HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise ValueError(
            f"--model {where}: no such repository on the Hugging Face Hub (or it is private: "
            "set HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise ValueError(
            f"--model {where}: the repository has no revision {source.revision!r}"
        ) from None
    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"--model {where}: the repository has no config.json at its top")
    return Path(path)
