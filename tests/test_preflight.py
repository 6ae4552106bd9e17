"""What `pdserve serve` finds wrong before it starts Ray and the ranks (`orchestrator.preflight`),
and how a rank that fails to start is reported: one line naming the flag, file or error, in
about a second instead of after a model load."""

from __future__ import annotations

import json
import shutil
import socket

import pytest

from orchestrator.config import ServeConfig
from orchestrator.preflight import check_host_memory, check_listen, preflight
from workers.engine.config import EngineConfig

pytestmark = pytest.mark.timeout(120)


def _config(**fields: object) -> ServeConfig:
    return ServeConfig(port=0, **fields)  # type: ignore[arg-type]


def test_expert_parallel_settings_are_checked_against_the_model(tiny_model_dir):
    assert preflight(_config(prefill_dp=2, decode_dp=4), tiny_model_dir, local=True) == []
    with pytest.raises(ValueError, match=r"--prefill-dp 3: the 16 experts .* = 16 expert slots"):
        preflight(_config(prefill_dp=3), tiny_model_dir, local=True)
    with pytest.raises(ValueError, match=r"--dp 3: .*--num-redundant-experts 4 = 20"):
        engine = EngineConfig(num_redundant_experts=4)
        preflight(_config(colocated=True, num_ranks=3, engine=engine), tiny_model_dir, True)
    engine = EngineConfig(num_redundant_experts=2, moe_a2a_backend="deepep")
    warnings = preflight(_config(engine=engine), tiny_model_dir, local=True)
    assert [w.split(" has no effect")[0] for w in warnings] == [
        "--num-redundant-experts",
        "--moe-a2a-backend deepep",
    ]
    engine = EngineConfig(moe_a2a_backend="deepep", device="cpu")
    with pytest.raises(ValueError, match="deepep needs CUDA GPUs"):
        preflight(_config(prefill_dp=2, engine=engine), tiny_model_dir, local=True)
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: torch finds no CUDA GPU"):
            preflight(_config(engine=EngineConfig(device="cuda")), tiny_model_dir, local=True)
        # The ranks of a cluster joined may have GPUs this machine lacks.
        preflight(_config(engine=EngineConfig(device="cuda")), tiny_model_dir, local=False)


def test_the_host_tiers_of_the_local_ranks_must_fit_in_the_machine(tiny_model_dir):
    gib = 1 << 30
    engine = EngineConfig(prefix_cache_host_space=5)
    check_host_memory(_config(engine=engine), 16 * gib)  # 2 ranks x 5 GiB fit in 16
    with pytest.raises(
        ValueError,
        match=r"--prefix-cache-host-space 5: 4 rank\(s\) would "
        r"reserve 20 GiB of host memory, and this machine has 16 GiB",
    ):
        check_host_memory(_config(engine=engine, decode_dp=2, prefill_dp=2), 16 * gib)
    check_host_memory(_config(engine=engine, decode_dp=2, prefill_dp=2), None)  # unknown: on
    huge = EngineConfig(prefix_cache_host_space=1e6)
    with pytest.raises(ValueError, match="--prefix-cache-host-space 1e\\+06: 2 rank"):
        preflight(_config(engine=huge), tiny_model_dir, local=True)
    preflight(_config(engine=huge), tiny_model_dir, local=False)  # a cluster's nodes: unknown


def test_a_saved_placement_is_checked_before_start(tiny_model_dir, tmp_path):
    path = tmp_path / "placement.json"

    def saved(pools: dict[str, object]) -> ServeConfig:
        path.write_text(json.dumps({"format": "pdserve-expert-placement/1", "pools": pools}))
        return _config(prefill_dp=2, init_expert_placement=str(path))

    layers, experts = 4, 16  # the tiny model's
    good = [list(range(experts)) for _ in range(layers)]
    preflight(saved({"prefill-0": good}), tiny_model_dir, local=True)
    with pytest.raises(ValueError, match=r"pools \['decode-0'\] are not expert-parallel pools"):
        preflight(saved({"decode-0": good}), tiny_model_dir, local=True)
    with pytest.raises(ValueError, match=r"--init-expert-placement .*needs 4 layers of 16"):
        preflight(saved({"prefill-0": good[:2]}), tiny_model_dir, local=True)
    lacking = [[0] * experts for _ in range(layers)]
    with pytest.raises(ValueError, match="no slot for experts"):
        preflight(saved({"prefill-0": lacking}), tiny_model_dir, local=True)


def test_listen_addresses_are_checked(tiny_model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=f"--port {port}: .*the port is in use"):
            preflight(ServeConfig(port=port), tiny_model_dir, local=True)
        with pytest.raises(ValueError, match=f"--grpc-port {port}: .*in use"):
            preflight(ServeConfig(port=0, grpc_port=port), tiny_model_dir, local=True)
    with pytest.raises(ValueError, match="is it an address of this machine"):
        check_listen("192.0.2.77", 30000, "--port")  # TEST-NET-1: never this machine's
    with pytest.raises(ValueError, match="--host no-such-host.invalid: cannot resolve it"):
        check_listen("no-such-host.invalid", 30000, "--port")
    check_listen("127.0.0.1", 0, "--port")
    with pytest.raises(ValueError, match="--grpc-port 31234: the same port as --port"):
        preflight(ServeConfig(port=31234, grpc_port=31234), tiny_model_dir, local=True)


def test_ipv6_addresses_are_bracketed_for_urls_and_grpc():
    from orchestrator.config import host_port

    assert host_port("::1", 30000) == "[::1]:30000"
    assert host_port("127.0.0.1", 30000) == "127.0.0.1:30000"
    assert host_port("localhost", 1) == "localhost:1"
    assert host_port("[::1]", 2) == "[::1]:2"


def test_a_checkpoint_without_an_mtp_module_is_refused_before_start(tiny_model_dir, tmp_path):
    """`--speculative-mtp` reads config.json and the safetensors headers: a checkpoint whose
    config says no module, or whose files lack its layer, is refused in one line."""
    from safetensors.torch import load_file, save_file

    mtp = _config(engine=EngineConfig(speculative_mtp=2))
    assert preflight(mtp, tiny_model_dir, local=True) == []  # (a CPU machine: no graphs to lose)
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = load_file(model / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("model.layers.4.")},
              str(model / "model.safetensors"))  # fmt: skip
    with pytest.raises(ValueError, match=r"--speculative-mtp 2: .* no tensor model.layers.4.\*"):
        preflight(mtp, model, local=True)
    assert preflight(_config(), model, local=True) == []  # served without the module: fine
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 0}))
    with pytest.raises(ValueError, match=r"num_nextn_predict_layers is 0 in its config.json"):
        preflight(mtp, model, local=True)


def test_tokenizer_problems_name_the_file(tiny_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config_path = model / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "chat_template": "{% if x %}x{% endfor %}"}))
    with pytest.raises(ValueError, match=r"tokenizer_config.json: the chat template does not"):
        preflight(_config(), model, local=True)
    config_path.write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer_config.json: not valid JSON"):
        preflight(_config(), model, local=True)
    config_path.write_text(json.dumps(config))
    (model / "tokenizer.json").write_text("[]")
    with pytest.raises(ValueError, match=r"tokenizer.json: not a tokenizer file"):
        preflight(_config(), model, local=True)
    for weights in model.glob("*.safetensors"):  # an interrupted download
        weights.unlink()
    with pytest.raises(ValueError, match=r"no \*.safetensors files"):
        preflight(_config(), model, local=True)


def test_serve_stops_at_the_first_mistake_without_starting_ray(capsys):
    from orchestrator.cli import main

    assert main(["serve", "--port", "0", "--prefill-dp", "3"]) == 2
    assert "error: --prefill-dp 3:" in capsys.readouterr().out
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{closed.getsockname()[1]}"
    for where in (address, f"[::1]:{address.rsplit(':', 1)[1]}"):  # IPv6 in brackets
        assert main(["serve", "--port", "0", "--address", where]) == 2
        out = capsys.readouterr().out
        assert f"error: --address {where}: no Ray cluster answers there" in out


def test_a_rank_that_fails_to_start_is_reported_by_its_error_line():
    from orchestrator.pool_instance import start_error

    remote = (
        "The actor died because of an error raised in its creation task, ray::EngineWorker."
        '__init__() (pid=1, ip=10.0.0.1)\n  File "/x/loader.py", line 3, in load\n'
        "    raise SafetensorError(...)\n"
        "safetensors_rust.SafetensorError: Error while deserializing header: incomplete"
    )
    assert start_error(RuntimeError(remote)) == (
        "SafetensorError: Error while deserializing header: incomplete"
    )
    assert start_error(RuntimeError("no traceback here\nat all")) == "no traceback here"
    assert start_error(RuntimeError("")) == "RuntimeError"


@pytest.mark.timeout(300)
def test_a_broken_checkpoint_is_reported_in_one_line(tiny_model_dir, tmp_path):
    """Weights that do not load fail the ranks at start; `serve` says which error, not Ray's
    traceback, and exits. (Its own process: `serve` starts and stops a Ray of its own.)"""
    import subprocess
    import sys

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = next(model.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    serve = [sys.executable, "-m", "orchestrator.cli", "serve", "--port", "0", "--colocated"]
    done = subprocess.run(
        [*serve, "--model", str(model)], capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 1, done.stdout + done.stderr
    (line,) = [line for line in done.stdout.splitlines() if "error:" in line]
    assert line.startswith("pdserve: error: engine rank 0 failed to start: "), done.stdout
    assert "creation task" not in line and "Traceback" not in done.stdout, done.stdout
