"""What `pdserve serve` checks before it starts anything (Ray, the ranks, the model load): all
it can find wrong from the flags, the checkpoint's config and tokenizer, a saved expert
placement, and this machine. A mistake found here costs a second and one line naming it; found
by a rank, it cost a model load (hundreds of GB for DeepSeek-V3) and came wrapped in a Ray
traceback.

`preflight(config, model_dir, local)` raises ValueError naming the flag or file, and returns the
warnings worth printing (a flag without effect, a vocabulary mismatch). `local`: the ranks will
run on this machine (a Ray this process starts), so its GPUs and packages are theirs.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import socket
from pathlib import Path

from orchestrator.config import ServeConfig
from orchestrator.pool_instance import pool_specs, read_expert_placements
from orchestrator.tokenizer import Tokenizer
from workers.model.config import ModelConfig


def preflight(config: ServeConfig, model_dir: Path, local: bool) -> list[str]:
    model = ModelConfig.from_dir(model_dir)
    if not any(model_dir.glob("*.safetensors")):
        raise ValueError(
            f"{model_dir}: no *.safetensors files (an interrupted download? pdserve reads "
            "safetensors checkpoints only)"
        )
    tokenizer = Tokenizer.from_dir(model_dir)
    warnings = check_pools(config, model, local)
    if local:
        check_host_memory(config, _host_memory_bytes())
    check_placements(config, model)
    check_mtp(config, model, model_dir)
    check_listen(config.host, config.port, "--port")
    if config.grpc_port:
        if config.grpc_port == config.port:
            raise ValueError(f"--grpc-port {config.grpc_port}: the same port as --port")
        check_listen(config.host, config.grpc_port, "--grpc-port")
    if local and config.engine.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "no GPU visible"
            raise ValueError(
                f"--device cuda: torch finds no CUDA GPU on this machine (torch "
                f"{torch.__version__}, {build}); leave --device out to run on the CPU"
            )
    if tokenizer.vocab_size > model.vocab_size:
        warnings.append(
            f"the tokenizer knows {tokenizer.vocab_size} tokens and the model {model.vocab_size}: "
            "prompts with the tokenizer's last ids will be refused"
        )
    return warnings


def check_mtp(config: ServeConfig, model: ModelConfig, model_dir: Path) -> None:
    """With `--speculative-mtp`: ValueError when the checkpoint has no MTP module (its
    config.json says none, or no tensor of its layer is in the safetensors files: their
    headers only are read)."""
    if not config.engine.speculative_mtp:
        return
    from safetensors import safe_open

    flag = f"--speculative-mtp {config.engine.speculative_mtp}"
    missing = model.mtp_missing(
        key
        for path in sorted(model_dir.glob("*.safetensors"))
        for key in safe_open(str(path), framework="pt").keys()  # noqa: SIM118 (not a dict)
    )
    if missing is not None:
        raise ValueError(
            f"{flag}: {model_dir} has no multi-token-prediction module ({missing}); use "
            "--speculative-ngram K, or a DeepSeek-V3/R1 checkpoint"
        )


def check_pools(config: ServeConfig, model: ModelConfig, local: bool) -> list[str]:
    """The expert-parallel settings against the topology and the model."""
    engine = config.engine
    expert_parallel = [s for s in pool_specs(config, 0) if s.num_ranks > 1]
    warnings = []
    if expert_parallel and not model.n_routed_experts:
        raise ValueError(
            "pools of several ranks are expert-parallel, and this model has no routed experts: "
            "use pools of one rank (--dp / --prefill-dp / --decode-dp 1) and more instances"
        )
    num_experts = model.n_routed_experts or 0
    slots = num_experts + engine.num_redundant_experts
    for spec in expert_parallel:
        if slots % spec.num_ranks:
            flag = "--dp" if spec.role == "colocated" else f"--{spec.role}-dp"
            raise ValueError(
                f"{flag} {spec.num_ranks}: the {num_experts} experts + "
                f"--num-redundant-experts {engine.num_redundant_experts} = {slots} expert slots "
                f"do not spread evenly over {spec.num_ranks} ranks; choose "
                "--num-redundant-experts so that the sum divides by every pool's rank count"
            )
    if not expert_parallel:
        if engine.num_redundant_experts:
            warnings.append(
                "--num-redundant-experts has no effect: no pool has several ranks "
                "(redundant experts are spread over an expert-parallel pool's ranks)"
            )
        if engine.moe_a2a_backend == "deepep":
            warnings.append("--moe-a2a-backend deepep has no effect: no pool has several ranks")
    elif engine.moe_a2a_backend == "deepep":
        if engine.device == "cpu":
            raise ValueError("--moe-a2a-backend deepep needs CUDA GPUs (--device cpu was given)")
        if local and importlib.util.find_spec("deep_ep") is None:
            raise ValueError(
                "--moe-a2a-backend deepep: the deep_ep package is not installed here; install "
                "DeepEP or use --moe-a2a-backend auto (torch.distributed all-to-all)"
            )
    return warnings


def _host_memory_bytes() -> int | None:
    """This machine's memory (None where it cannot be read)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_host_memory(config: ServeConfig, memory_bytes: int | None) -> None:
    """Every local rank's prefix-cache host tier is reserved at start: refused when together
    they pass this machine's memory (they would fail in the ranks, after Ray and the model)."""
    engine = config.engine
    if not memory_bytes or not engine.prefix_cache_host_space:
        return
    num_ranks = sum(spec.num_ranks for spec in pool_specs(config, 0))
    memory_gib = memory_bytes / (1 << 30)
    host_tier = engine.prefix_cache_host_space * num_ranks
    if host_tier > memory_gib:
        raise ValueError(
            f"--prefix-cache-host-space {engine.prefix_cache_host_space:g}: {num_ranks} "
            f"rank(s) would reserve {host_tier:g} GiB of host memory, and this machine has "
            f"{memory_gib:.0f} GiB"
        )


def check_placements(config: ServeConfig, model: ModelConfig) -> None:
    """A saved placement (`--init-expert-placement`): one per expert-parallel pool it names,
    each of this model's shape."""
    from eplb.service import checked_phy2log

    saved = read_expert_placements(config.init_expert_placement)
    if not saved:
        return
    pools = {s.name for s in pool_specs(config, 0) if s.num_ranks > 1}
    where = f"--init-expert-placement {config.init_expert_placement}"
    unknown = sorted(set(saved) - pools)
    if unknown:
        raise ValueError(
            f"{where}: pools {unknown} are not expert-parallel pools of this topology "
            f"({sorted(pools) or 'none'})"
        )
    num_experts = model.n_routed_experts or 0
    slots = num_experts + config.engine.num_redundant_experts
    for name, phy2log in saved.items():
        try:
            checked_phy2log(name, phy2log, model.num_hidden_layers, slots, num_experts)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None


def check_listen(host: str, port: int, flag: str) -> None:
    """That `host:port` can be listened on now (port 0: any free one will do)."""
    try:
        infos = socket.getaddrinfo(host, port or None, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    if not port:
        return
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn and gRPC do
        try:
            s.bind(address)
        except OSError as e:
            hint = {
                errno.EADDRINUSE: "; the port is in use",
                errno.EADDRNOTAVAIL: "; is it an address of this machine?",
                errno.EACCES: "; ports below 1024 need privileges",
            }.get(e.errno or 0, "")
            raise ValueError(
                f"{flag} {port}: cannot listen on {host}:{port} ({e.strerror}{hint})"
            ) from None
