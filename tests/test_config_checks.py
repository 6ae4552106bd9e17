"""Settings are refused before anything starts, with a message naming the flag (or the file and
key) to fix: `pdserve serve` flags through `serve_config`, and a checkpoint's `config.json`
through `ModelConfig.from_dir`, the call the serving process makes before the ranks start."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from orchestrator.cli import build_parser, serve_config
from orchestrator.config import ServeConfig
from workers.engine.config import EngineConfig
from workers.model.config import ModelConfig

pytestmark = pytest.mark.timeout(30)


def serve(*flags: str) -> ServeConfig:
    """The config `pdserve serve FLAGS...` builds (no server is started)."""
    config: ServeConfig = serve_config(build_parser().parse_args(["serve", *flags]))
    return config


# ---- pdserve serve flags ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--request-timeout", "nan"), "--request-timeout must be a positive number of seconds, got nan"),
        (("--request-timeout", "inf"), "--request-timeout must be a positive number of seconds, got inf"),
        (("--transfer-timeout", "nan"), "--transfer-timeout must be a positive number of seconds, got nan"),
        (("--transfer-timeout=-inf",), "--transfer-timeout must be a positive number of seconds"),
        (("--drain-timeout", "nan"), "--drain-timeout must be a number of seconds >= 0"),
        (("--drain-timeout", "inf"), "--drain-timeout must be a number of seconds >= 0"),
        (("--kv-pressure-interval", "-1"), "--kv-pressure-interval must be a number of seconds >= 0"),
        (("--kv-pressure-interval", "nan"), "--kv-pressure-interval must be a number of seconds >= 0"),
        (("--eplb-interval-s", "nan"), "--eplb-interval-s must be a positive number of seconds, got nan"),
        (("--eplb-min-balancedness", "nan"), "--eplb-min-balancedness must be in (0, 1], got nan"),
        (("--kv-memory-fraction", "nan"), "--kv-memory-fraction must be in (0, 0.95], got nan"),
        (("--kv-swap-space", "-1"), "--kv-swap-space must be >= 0 (GiB), got -1.0"),
        (("--kv-swap-space", "inf"), "--kv-swap-space must be >= 0 (GiB), got inf"),
        (("--speculative-ngram", "-1"), "--speculative-ngram must be >= 0, got -1"),
        (("--speculative-ngram-min", "5"), "--speculative-ngram-min and --speculative-ngram-max must satisfy"),
        (("--prefix-cache-host-space", "-2"), "--prefix-cache-host-space must be >= 0 (GiB)"),
        (("--prefix-cache-host-space", "1", "--disable-prefix-caching"),
         "--prefix-cache-host-space is the prefix cache's second tier: it needs prefix caching"),
        (("--max-context-len", "-5"), "--max-context-len must be >= 1 tokens"),
        (("--max-context-len", "0"), "--max-context-len must be >= 1 tokens"),
        (("--dp", "0"), "--dp must be >= 1, got 0"),
        (("--prefill-dp", "0"), "--prefill-dp must be >= 1, got 0"),
        (("--page-size", "0"), "--page-size must be >= 1, got 0"),
        (("--kv-capacity-tokens", "8"), "--kv-capacity-tokens (8) must hold at least one page"),
        (("--num-threads", "0"), "--num-threads must be >= 1, got 0"),
        (("--max-running-requests", "0"), "--max-running-requests must be >= 1, got 0"),
        (("--chunked-prefill-size", "0"), "--chunked-prefill-size must be >= 1, got 0"),
        (("--stream-interval", "0"), "--stream-interval must be >= 1, got 0"),
        (("--num-redundant-experts", "-1"), "--num-redundant-experts must be >= 0, got -1"),
        (("--cuda-graph-max-batch", "-1"), "--cuda-graph-max-batch must be >= 0"),
        (("--low-latency-capacity", "0"), "--low-latency-capacity must be >= 1, got 0"),
        (("--max-request-body-bytes", "10"), "--max-request-body-bytes must be >= 1024, got 10"),
    ],
)  # fmt: skip
def test_bad_flags_are_refused_naming_the_flag(flags: tuple[str, ...], message: str) -> None:
    with pytest.raises(ValueError) as info:
        serve(*flags)
    assert str(info.value).startswith(message), str(info.value)


def test_max_context_len_given_is_kept_and_absent_is_the_models() -> None:
    assert serve("--max-context-len", "1").engine.max_context_len == 1
    assert serve().engine.max_context_len is None


@pytest.mark.parametrize(
    "field",
    [
        "placement_timeout_s",
        "ready_timeout_s",
        "stream_silence_s",
        "request_timeout_s",
        "rank_restart_wait_s",
        "sse_keepalive_s",
        "transfer_timeout_s",
        "drain_timeout_s",
        "scale_drain_timeout_s",
        "kv_pressure_interval_s",
        "eplb_interval_s",
        "eplb_min_balancedness",
    ],
)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_every_float_setting_refuses_nan_and_infinity(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=r"\b(nan|inf)\b"):
        ServeConfig(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "field",
    [
        "kv_memory_fraction",
        "kv_swap_space",
        "prefix_cache_host_space",
        "gpu_memory_share",
        "pool_formation_timeout_s",
    ],
)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_every_engine_float_setting_refuses_nan_and_infinity(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=rf"^{field}|^--{field.replace('_', '-')}"):
        EngineConfig(**{field: value})  # type: ignore[arg-type]


def test_good_float_settings_still_pass() -> None:
    config = serve("--request-timeout", "0.5", "--drain-timeout", "0", "--transfer-timeout", "1e3",
                   "--scale-drain-timeout", "0")  # fmt: skip
    assert (config.request_timeout_s, config.drain_timeout_s) == (0.5, 0.0)
    assert config.scale_drain_timeout_s == config.scale_drain_s == 0.0
    with pytest.raises(ValueError, match="^--scale-drain-timeout must be"):
        serve("--scale-drain-timeout", "-1")
    assert config.transfer_timeout_s == 1000.0
    assert EngineConfig(pool_formation_timeout_s=0.1, kv_memory_fraction=0.95).kv_memory_fraction


# ---- the checkpoint's config.json ------------------------------------------------------------


@pytest.fixture
def model_dir(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A copy of the tiny checkpoint's config.json (the weights are not read)."""
    dst = tmp_path / "model"
    dst.mkdir()
    shutil.copy(tiny_model_dir / "config.json", dst / "config.json")
    return dst


def with_config(model_dir: Path, **changes: Any) -> Path:
    path = model_dir / "config.json"
    hf = json.loads(path.read_text())
    hf.update(changes)
    path.write_text(json.dumps(hf))
    return path


def refusal(model_dir: Path) -> str:
    with pytest.raises(ValueError) as info:
        ModelConfig.from_dir(model_dir)
    return str(info.value)


def test_the_tiny_config_passes(model_dir: Path) -> None:
    cfg = ModelConfig.from_dir(model_dir)
    assert (cfg.num_hidden_layers, cfg.n_group, cfg.topk_group) == (4, 4, 2)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"model_type": "deepseek_v3",', "not valid JSON (Expecting"),
        ("[1, 2]", "expected a JSON object of keys, got list"),
        ('"deepseek_v3"', "expected a JSON object of keys, got str"),
    ],
)
def test_a_config_that_is_not_a_json_object_names_the_file(
    model_dir: Path, text: str, expected: str
) -> None:
    path = model_dir / "config.json"
    path.write_text(text)
    assert refusal(model_dir).startswith(f"{path}: {expected}")


def test_a_config_that_is_not_utf8_names_the_file(model_dir: Path) -> None:
    path = model_dir / "config.json"
    path.write_bytes(b"\xff\xfe{}")
    assert refusal(model_dir).startswith(f"{path}: not UTF-8 text")


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"num_hidden_layers": "4"}, "num_hidden_layers must be a positive integer, got '4'"),
        ({"vocab_size": -5}, "vocab_size must be a positive integer, got -5"),
        ({"hidden_size": 128.0}, "hidden_size must be a positive integer, got 128.0"),
        ({"qk_rope_head_dim": True}, "qk_rope_head_dim must be a positive integer, got True"),
        ({"v_head_dim": None}, "v_head_dim must be a positive integer, got None"),
        ({"q_lora_rank": 0}, "q_lora_rank must be a positive integer, got 0"),
        ({"max_position_embeddings": 0}, "max_position_embeddings must be a positive integer"),
        ({"n_group": 0}, "n_group must be a positive integer, got 0"),
        ({"topk_group": -1}, "topk_group must be a positive integer, got -1"),
        ({"moe_layer_freq": 0}, "moe_layer_freq must be a positive integer, got 0"),
        ({"first_k_dense_replace": -1}, "first_k_dense_replace must be an integer >= 0"),
        ({"n_routed_experts": -16}, "n_routed_experts must be an integer >= 0, got -16"),
        ({"moe_intermediate_size": 0}, "moe_intermediate_size must be a positive integer, got 0"),
        ({"num_experts_per_tok": 17}, "num_experts_per_tok (17) must be <= n_routed_experts (16)"),
        ({"eos_token_id": [1, "2"]}, "eos_token_id[1] must be an integer >= 0, got '2'"),
        ({"bos_token_id": -1}, "bos_token_id must be an integer >= 0, got -1"),
        ({"rms_norm_eps": float("nan")}, "rms_norm_eps must be a positive number, got nan"),
        ({"routed_scaling_factor": 0}, "routed_scaling_factor must be a positive number, got 0"),
        ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false"),
        ({"rope_scaling": "yarn"}, "rope_scaling must be a JSON object or null, got 'yarn'"),
        (
            {"rope_scaling": {"type": "yarn", "factor": float("inf")}},
            "rope_scaling.factor must be a positive number, got inf",
        ),
        (
            {"rope_scaling": {"type": "yarn", "original_max_position_embeddings": "1024"}},
            "rope_scaling.original_max_position_embeddings must be a positive integer",
        ),
        (
            {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128]}},
            "quantization_config.weight_block_size must be a pair of positive integers "
            "[rows, columns], got [128]",
        ),
        (
            {"quantization_config": {"quant_method": "fp8", "weight_block_size": [0, 128]}},
            "quantization_config.weight_block_size must be a pair of positive integers",
        ),
        ({"quantization_config": ["fp8"]}, "quantization_config must be a JSON object"),
        # The messages that were good already stay as they were.
        ({"model_type": "llama"}, "model_type 'llama' is not supported; pdserve serves"),
        ({"topk_group": 5}, "topk_group must be in [1, n_group], got 5"),
    ],
)
def test_bad_config_values_name_the_file_and_the_key(
    model_dir: Path, changes: dict[str, Any], expected: str
) -> None:
    path = with_config(model_dir, **changes)
    message = refusal(model_dir)
    assert message.startswith(f"{path}: {expected}"), message


def test_a_missing_key_is_named(model_dir: Path) -> None:
    path = model_dir / "config.json"
    hf = json.loads(path.read_text())
    del hf["kv_lora_rank"]
    path.write_text(json.dumps(hf))
    assert refusal(model_dir) == f"{path}: lacks kv_lora_rank"


def test_null_keeps_meaning_the_default(model_dir: Path) -> None:
    """transformers writes `n_group: null` (and more) for V2 configs: null is the default."""
    with_config(
        model_dir, n_group=None, topk_group=None, num_experts_per_tok=None, q_lora_rank=None
    )
    cfg = ModelConfig.from_dir(model_dir)
    assert (cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok) == (1, 1, 1)
    assert cfg.q_lora_rank is None


def test_from_hf_names_config_json(tiny_model_dir: Path) -> None:
    hf = json.loads((tiny_model_dir / "config.json").read_text())
    with pytest.raises(ValueError, match=re.escape("config.json: vocab_size must be")):
        ModelConfig.from_hf({**hf, "vocab_size": 0})
