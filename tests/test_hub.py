"""`--model ORG/NAME`: a Hugging Face Hub repository, found in (or fetched into) the Hub cache.
There is no network here, so the tests lay out a Hub cache by hand (huggingface_hub's own
layout: `models--ORG--NAME/refs/main` naming a commit, `snapshots/<commit>/` its files) and run
`huggingface_hub` offline against it."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from tests.conftest import tiny_serve_config

pytestmark = pytest.mark.timeout(300)

REPO = "pdserve-test/tiny-v3"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, tiny_model_dir, monkeypatch) -> Path:
    """A Hub cache holding REPO (the tiny checkpoint) at COMMIT, tagged main; offline."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    repo = tmp_path / "hub" / f"models--{REPO.replace('/', '--')}"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return tmp_path / "hub"


def test_a_repository_id_resolves_to_its_snapshot_and_errors_say_what_is_wrong(
    hub_cache, tiny_model_dir, tmp_path
):
    from orchestrator.config import ServeConfig
    from workers.model.hub import CheckpointSource, check_model_arg, checkpoint_dir

    snapshot = hub_cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    source = CheckpointSource(REPO, download_dir=str(hub_cache))
    assert source.is_hub_repo
    check_model_arg(source)
    assert checkpoint_dir(source) == snapshot
    assert checkpoint_dir(CheckpointSource(REPO, COMMIT, str(hub_cache))) == snapshot
    # A rank uses the dir the router found where it exists on its machine too, and otherwise
    # resolves the repository itself (a node of its own, with its own cache).
    assert checkpoint_dir(source, str(tiny_model_dir)) == tiny_model_dir
    assert checkpoint_dir(source, str(tmp_path / "not-on-this-node")) == snapshot
    config = ServeConfig(model=REPO, download_dir=str(hub_cache))
    assert config.model_name(snapshot) == REPO  # not the commit the snapshot dir is named by
    assert ServeConfig(model=str(tiny_model_dir)).model_name(tiny_model_dir) == tiny_model_dir.name
    # What cannot be served is named.
    with pytest.raises(ValueError, match="not in the Hub cache"):
        checkpoint_dir(CheckpointSource("pdserve-test/absent", download_dir=str(hub_cache)))
    with pytest.raises(ValueError, match="not in the Hub cache"):
        checkpoint_dir(CheckpointSource(REPO, "no-such-branch", str(hub_cache)))
    with pytest.raises(ValueError, match="no such dir, and not a Hugging Face repository id"):
        ServeConfig(model=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no such dir"):
        ServeConfig(model="a/b/c")  # neither a path nor ORG/NAME
    with pytest.raises(ValueError, match="no such dir"):
        ServeConfig(model="myorg/t\u00efny")  # repository ids are ASCII
    with pytest.raises(ValueError, match="--model myorg/..: not a valid repository id"):
        checkpoint_dir(CheckpointSource("myorg/..", download_dir=str(hub_cache)))
    with pytest.raises(ValueError, match="no config.json"):
        ServeConfig(model=str(tmp_path))
    with pytest.raises(ValueError, match="--revision is for Hub repositories"):
        ServeConfig(model=str(tiny_model_dir), revision="main")
    with pytest.raises(ValueError, match="go with --model"):
        ServeConfig(revision="main")
    with pytest.raises(FileNotFoundError, match="every node needs the checkpoint"):
        checkpoint_dir(CheckpointSource(str(tmp_path / "gone")))  # a dir this node lacks


def test_serving_a_repository_id(hub_cache, ray_session, tiny_model_dir, tiny_server):
    """`launch` fetches (here: finds) the repository, the ranks load it, the API names it by
    its id, and it generates what the same checkpoint from its dir generates."""
    from orchestrator.launcher import launch

    config = tiny_serve_config(tiny_model_dir, model=REPO, download_dir=str(hub_cache))
    server = launch(config)
    try:
        models = httpx.get(server.url + "/v1/models", timeout=30).json()["data"]
        assert [m["id"] for m in models] == [REPO]
        body = {
            "input_ids": [5, 6, 7, 8],
            "sampling_params": {"max_new_tokens": 6, "temperature": 0},
        }
        ours = httpx.post(server.url + "/generate", json=body, timeout=120).json()
        theirs = httpx.post(tiny_server + "/generate", json=body, timeout=120).json()
        assert ours["output_ids"] == theirs["output_ids"] and len(ours["output_ids"]) == 6
    finally:
        server.stop()
