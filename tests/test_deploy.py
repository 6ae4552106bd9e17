"""deploy/: the `ray up` configs pass Ray's own validation, and deploy/serve.yaml is a valid set of
`pdserve serve` flags that the command line overrides (orchestrator/serve_file.py)."""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.cli import build_parser, serve_config
from orchestrator.placement import POOL_LABEL
from orchestrator.serve_file import SCHEMA_PATH, load_serve_file, merge_serve_args

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
SERVE_YAML = DEPLOY / "serve.yaml"


def ray_validate(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` checks before it contacts the provider: defaults filled in (`prepare_config`),
    then Ray's JSON schema and cross-field rules (`validate_config`)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def load_cluster(name: str) -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / name).read_text())


def serve_parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The `pdserve` parser and its `serve` subparser."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub.choices["serve"]


def parse_serve(argv: list[str], config: Path) -> tuple[argparse.Namespace, list[str]]:
    """`pdserve serve --config CONFIG ARGV...` parsed; without a `--config` flag in the parser
    (not wired in yet), `args.config` is set by hand and argv goes without it."""
    parser, serve = serve_parsers()
    has_config = any(a.dest == "config" for a in serve._actions)
    full = ["serve", *(["--config", str(config)] if has_config else []), *argv]
    args = parser.parse_args(full)
    if not has_config:
        args.config = str(config)
    return args, full


def schema_leaves(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = []
    for key, prop in schema["properties"].items():
        if prop.get("type") == "object":
            out += schema_leaves(prop, f"{path}{key}.")
        else:
            out.append((f"{path}{key}", prop))
    return out


# ---- ray up configs -----------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_aws_cluster_config_passes_ray_validation() -> None:
    config = ray_validate(load_cluster("cluster.yaml"))
    types = config["available_node_types"]
    pools = {types[t].get("labels", {}).get(POOL_LABEL) for t in types}
    assert pools == {None, "prefill", "decode"}  # an unlabelled head, one type per pool
    head = types[config["head_node_type"]]
    assert POOL_LABEL not in head.get("labels", {})
    serve = load_serve_file(DEPLOY / "serve.yaml")
    for name, node_type in types.items():
        if name == config["head_node_type"]:
            continue
        assert node_type["resources"]["GPU"] == 8
        # Nodes for the instances it starts, and for those it may add by load (one GPU a rank).
        start, most = serve[f"{name}_instances"], serve.get(f"max_{name}_instances")
        nodes = serve[f"{name}_dp"] // 8
        assert node_type["min_workers"] == start * nodes
        assert node_type["max_workers"] == (most or start) * nodes
    assert config["max_workers"] == sum(
        t["max_workers"] for n, t in types.items() if n != config["head_node_type"]
    )
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    assert any("--address=$RAY_HEAD_IP:6379" in c for c in config["worker_start_ray_commands"])


@pytest.mark.timeout(30)
def test_onprem_cluster_config_passes_ray_validation() -> None:
    raw = load_cluster("cluster-onprem.yaml")
    config = ray_validate(raw)
    assert config["provider"]["type"] == "local"
    start = " ".join(config["worker_start_ray_commands"])
    assert f'--labels="{POOL_LABEL}=$POOL"' in start
    assert "--address=$RAY_HEAD_IP:6379" in start
    workers = config["available_node_types"]["local.cluster.node"]
    assert workers["min_workers"] == len(raw["provider"]["worker_ips"])


@pytest.mark.timeout(30)
def test_start_commands_keep_ray_token_auth_on() -> None:
    for name in ("cluster.yaml", "cluster-onprem.yaml"):
        config = load_cluster(name)
        for key in ("head_start_ray_commands", "worker_start_ray_commands"):
            starts = [c for c in config[key] if "ray start" in c]
            assert starts and all("RAY_AUTH_MODE=token ray start" in c for c in starts), name
        assert "~/.ray/auth_token" in config["file_mounts"], name


@pytest.mark.timeout(30)
def test_broken_cluster_configs_fail_ray_validation() -> None:
    import jsonschema

    typo = load_cluster("cluster.yaml")
    typo["available_node_types"]["prefill"]["label"] = {POOL_LABEL: "prefill"}  # not `labels`
    with pytest.raises(jsonschema.ValidationError, match="label"):
        ray_validate(typo)
    bad_value = load_cluster("cluster.yaml")
    bad_value["available_node_types"]["decode"]["labels"] = {POOL_LABEL: 1}  # not a string
    with pytest.raises(jsonschema.ValidationError):
        ray_validate(bad_value)
    no_head = load_cluster("cluster.yaml")
    no_head["head_node_type"] = "gpu-head"
    with pytest.raises(ValueError, match="head_node_type"):
        ray_validate(no_head)


# ---- serve file ---------------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_serve_yaml_keys_are_serve_flags() -> None:
    _, serve = serve_parsers()
    dests = {a.dest for a in serve._actions}
    values = load_serve_file(SERVE_YAML)
    assert values and set(values) <= dests, set(values) - dests
    assert values["prefill_dp"] == 16 and values["transfer_timeout"] == 60.0
    assert isinstance(values["eplb_interval_s"], float)  # `number` keys typed as argparse would


@pytest.mark.timeout(10)
def test_schema_matches_the_serve_parser() -> None:
    """Every key of the schema is one `serve` flag, with the flag's type and choices."""
    _, serve = serve_parsers()
    actions = {a.dest: a for a in serve._actions}
    schema = json.loads(SCHEMA_PATH.read_text())
    seen: set[str] = set()
    for path, prop in schema_leaves(schema):
        dest = prop.get("x-dest", path.rsplit(".", 1)[-1])
        assert dest in actions, f"{path}: no `serve` flag with dest {dest!r}"
        assert dest not in seen, f"{path}: a second key for {dest!r}"
        seen.add(dest)
        action = actions[dest]
        types = prop["type"] if isinstance(prop["type"], list) else [prop["type"]]
        if action.choices is not None:
            assert prop["enum"] == list(action.choices), path
        if action.type is int:
            assert "integer" in types, path
        if action.type is float:
            assert "number" in types, path
        if isinstance(action, argparse._StoreTrueAction):
            assert types == ["boolean"], path


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "topology:\n  prefill_dpp: 2\n",
            "topology.prefill_dpp: unknown key; known: colocated, dp",
        ),
        (
            "pot: 30000\n",
            "pot: unknown key; known: model, revision, download_dir, served_model_name, address",
        ),
        ("port: '30000'\n", 'port: expected an integer, got "30000" (a string)'),
        ("engine:\n  page_size: 1.5\n", "engine.page_size: expected an integer, got 1.5"),
        ("engine:\n  dtype: fp8\n", "engine.dtype: must be one of float32, bfloat16, float16"),
        ("eplb:\n  interval_s: 0\n", "eplb.interval_s: must be > 0, got 0"),
        ("transfer: nixl\n", 'transfer: expected a mapping of keys, got "nixl"'),
        ("admin_token_env: s3cr3t-t0ken\n", "admin_token_env: must match"),
        (
            "engine:\n  kv_capacity_tokens: 4096\n  kv_memory_fraction: 0.5\n",
            "engine: kv_capacity_tokens and kv_memory_fraction exclude each other",
        ),
        ("port: 1\nport: 2\n", "key 'port' given twice"),
        ("- port\n", "top level: expected a mapping of keys, got a list"),
        # Integral floats load as ints; fractional ones are refused.
        ("port: 32014.5\n", "port: expected an integer, got 32014.5 (a number) (HTTP port"),
        ("topology:\n  prefill_dp: 1.5\n", "topology.prefill_dp: expected an integer, got 1.5"),
    ],
)
def test_bad_serve_file_names_file_key_and_what_is_allowed(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        load_serve_file(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert expected in message, message


@pytest.mark.timeout(10)
def test_admin_token_comes_from_the_named_env_var(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text("admin_token_env: MY_PDSERVE_TOKEN\n")
    monkeypatch.setenv("MY_PDSERVE_TOKEN", "t" * 16)
    assert load_serve_file(path) == {"admin_token": "t" * 16}
    monkeypatch.delenv("MY_PDSERVE_TOKEN")
    assert load_serve_file(path) == {"admin_token": None}  # unset: admin is off


@pytest.mark.timeout(10)
def test_command_line_flags_override_the_file() -> None:
    parser, _ = serve_parsers()
    args, argv = parse_serve(
        ["--prefill-dp", "2", "--page-size", "16", "--kv-capacity-tokens", "4096", "--colocated"],
        SERVE_YAML,
    )
    merged = merge_serve_args(args, parser, argv)
    assert merged.prefill_dp == 2  # flag over the file's 16
    assert merged.page_size == 16  # given explicitly, though equal to the default
    assert merged.colocated is True  # flag over the file's false
    assert merged.decode_dp == 16 and merged.transfer_timeout == 60.0  # the file's values
    assert merged.dtype == "bfloat16" and merged.grpc_port == 50051
    assert merged.kv_capacity_tokens == 4096
    assert merged.kv_memory_fraction is None  # the file's 0.85 loses to the exclusive flag
    assert merged.dp == 1  # in neither: the flag's default
    assert args.decode_dp == 1  # `args` itself is left as parsed


@pytest.mark.timeout(10)
def test_merge_without_config_returns_args_unchanged() -> None:
    parser, _ = serve_parsers()
    args = parser.parse_args(["serve", "--prefill-dp", "3"])
    if not hasattr(args, "config"):
        args.config = None
    assert merge_serve_args(args, parser, ["serve", "--prefill-dp", "3"]) is args


@pytest.mark.timeout(10)
def test_merged_args_build_a_valid_serve_config(tmp_path: Path) -> None:
    model = tmp_path / "DeepSeek-V3"
    model.mkdir()
    (model / "config.json").write_text("{}")  # ServeConfig checks only that it is a checkpoint
    parser, _ = serve_parsers()
    args, argv = parse_serve(["--model", str(model), "--decode-dp", "8"], SERVE_YAML)
    config = serve_config(merge_serve_args(args, parser, argv))
    assert config.model == str(model)
    assert (config.prefill_dp, config.decode_dp, config.colocated) == (16, 8, False)
    assert config.ray_address == "auto" and config.grpc_port == 50051
    assert config.transfer_timeout_s == 60.0 and config.eplb_interval_s == 600.0
    assert config.engine.dtype == "bfloat16" and config.engine.num_redundant_experts == 32
    assert config.engine.enable_two_batch_overlap is True


@pytest.mark.timeout(10)
def test_integral_floats_of_integer_keys_become_ints(tmp_path: Path) -> None:
    """YAML `32014.0` passes the schema (JSON Schema counts 1.0 an integer) but `range(1.0)`
    fails deep inside a rank: integer keys are loaded as int, and serve with them."""
    path = tmp_path / "serve.yaml"
    path.write_text("port: 32014.0\ntopology:\n  prefill_dp: 2.0\nengine:\n  page_size: 16.0\n")
    values = load_serve_file(path)
    assert values == {"port": 32014, "prefill_dp": 2, "page_size": 16}
    assert all(type(v) is int for v in values.values())
    parser, _ = serve_parsers()
    args, argv = parse_serve([], path)
    config = serve_config(merge_serve_args(args, parser, argv))
    assert (config.port, config.prefill_dp, config.engine.page_size) == (32014, 2, 16)
    assert list(range(config.prefill_dp)) == [0, 1]


@pytest.mark.timeout(10)
def test_a_serve_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    path = tmp_path / "serve.yaml"
    path.write_bytes(b"port: 30000\nhost: \xff\xfe\n")
    with pytest.raises(ValueError) as info:
        load_serve_file(path)
    assert str(info.value).startswith(f"{path}: not UTF-8 text ("), str(info.value)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("text", "flag"),
    [
        ("requests:\n  request_timeout: .nan\n", "--request-timeout"),
        ("requests:\n  drain_timeout: .nan\n", "--drain-timeout"),
        ("transfer:\n  timeout: .inf\n", "--transfer-timeout"),
        ("eplb:\n  interval_s: .nan\n", "--eplb-interval-s"),
    ],
)
def test_nan_and_infinity_in_the_file_are_refused_naming_the_flag(
    tmp_path: Path, text: str, flag: str
) -> None:
    """The schema's bounds let NaN through (NaN <= 0 is false); `ServeConfig` refuses it."""
    path = tmp_path / "serve.yaml"
    path.write_text(text)
    parser, _ = serve_parsers()
    args, argv = parse_serve([], path)
    with pytest.raises(ValueError, match=f"^{flag} must be .*, got (nan|inf)$"):
        serve_config(merge_serve_args(args, parser, argv))


@pytest.mark.timeout(10)
def test_a_local_ray_declares_the_cpus_its_ranks_take_on_a_small_machine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`pdserve serve` without a cluster starts a Ray of its own: on a machine with fewer cores
    than the topology's ranks take, that Ray declares what they take (ranks share cores)
    instead of refusing the topology; a cluster joined is never resized."""
    from orchestrator.launcher import local_ray_cpus
    from orchestrator.pool_instance import starts_local_ray

    parser = build_parser()

    def config(*argv: str) -> Any:
        return serve_config(parser.parse_args(["serve", *argv]))

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    two_by_two = config("--prefill-dp", "2", "--decode-dp", "2")
    assert starts_local_ray(two_by_two)
    assert local_ray_cpus(two_by_two, num_cores=2) == 4
    assert local_ray_cpus(two_by_two, num_cores=4) is None  # the cores hold them: Ray counts
    assert local_ray_cpus(config("--colocated", "--dp", "3", "--num-threads", "2"), 4) == 6
    assert local_ray_cpus(config("--decode-instances", "2"), 2) == 3
    # Room for the instances autoscaling may add: 1 prefill + up to 3 decode ranks of 2 threads.
    most = config("--max-decode-instances", "3", "--num-threads", "2")
    assert local_ray_cpus(most, 4) == 8
    assert local_ray_cpus(config("--colocated", "--dp", "2", "--max-instances", "2"), 2) == 4
    assert not starts_local_ray(config("--address", "auto"))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert not starts_local_ray(two_by_two)
