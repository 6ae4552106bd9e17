"""Load a Hugging Face DeepSeek checkpoint dir into `DeepseekForCausalLM`.

Reads single or sharded `*.safetensors` (memory-mapped), dequantizes FP8 block-quantized weights
(`weight_scale_inv`, any block size, edges not multiples of the block) and stacks per-expert
weights into the model's `w13` / `w2` tensors.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from workers.ep.moe import EPContext
from workers.model.config import ModelConfig
from workers.model.fp8 import dequantize_block_fp8
from workers.model.model import DeepseekForCausalLM
from workers.model.moe import RoutedExperts

_EXPERT_KEY = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
# The MTP module's own parts (`workers.model.mtp.MTPLayer`); the rest of its layer is a
# decoder layer (`block`); its embedding and head are the main model's, not loaded.
_MTP_OWN = ("enorm.", "hnorm.", "eh_proj.", "shared_head.norm.")
_MTP_SHARED = ("embed_tokens.", "shared_head.head.")
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")
_SCALE_SUFFIX = "_scale_inv"
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        with open(index) as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    return files


def load_model(
    model_dir: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    max_positions: int | None = None,
    progress: bool = True,
    ep: EPContext | None = None,
    keep_fp8_experts: bool = False,
    mtp: bool = False,
) -> DeepseekForCausalLM:
    """The model of `model_dir` on `device` in `dtype`. With `ep`, each MoE layer loads only
    the experts of the rank's slots (`RoutedExperts.slot_experts`); other experts' tensors are
    not read. `keep_fp8_experts`: an FP8 checkpoint's routed experts stay float8 with their
    block scales (for the fused MoE kernel), where `fp8_experts_keepable` allows it. `mtp`:
    load the multi-token-prediction module too (a draft model for speculative decoding)."""
    model_dir = Path(model_dir)
    cfg = ModelConfig.from_dir(model_dir)
    files = checkpoint_files(model_dir)
    handles = [safe_open(str(f), framework="pt") for f in files]
    key_to_handle = {k: h for h in handles for k in h.keys()}  # noqa: SIM118 (not a dict)
    missing_mtp = cfg.mtp_missing(key_to_handle) if mtp else None
    if missing_mtp is not None:
        raise ValueError(f"{model_dir} has no multi-token-prediction module ({missing_mtp})")
    model = DeepseekForCausalLM(cfg, max_positions, ep, mtp)
    block = cfg.quant.weight_block_size if cfg.quant else (128, 128)
    keep_fp8 = keep_fp8_experts and fp8_experts_keepable(cfg)
    if keep_fp8:
        for module in model.modules():
            if isinstance(module, RoutedExperts):
                module.hold_fp8(block)
    params = dict(model.named_parameters())
    scales = _expert_scales(model) if keep_fp8 else {}
    slots = _expert_slots(model)
    loaded: set[str] = set()
    keys = [k for k in key_to_handle if not k.endswith(_SCALE_SUFFIX)]
    bar = tqdm(
        keys, desc=f"Loading {model_dir.name}", unit="tensor", disable=not progress, file=sys.stderr
    )
    for key in bar:
        name = _model_key(key, cfg.num_hidden_layers, mtp)
        if name is None:
            continue  # an MTP module not served, or its copy of the main model's weights
        target, index = _target(name)
        dest_slots = [] if index is None else slots.get(target, {}).get(index[0], [])
        if index is not None and target in slots and not dest_slots:
            if index[0] >= (cfg.n_routed_experts or 0):
                raise ValueError(
                    f"{key}: expert {index[0]} is beyond the {cfg.n_routed_experts} routed "
                    f"experts of config.json (n_routed_experts) in {model_dir}"
                )
            continue  # an expert this rank does not hold
        tensor = _floating(key, key_to_handle[key].get_tensor(key))
        scale_key = key + _SCALE_SUFFIX
        scale: torch.Tensor | None = None
        if tensor.dtype in _FP8_DTYPES:
            if scale_key not in key_to_handle:
                raise ValueError(f"{key} is float8 but {scale_key} is missing from the checkpoint")
            scale = _floating(scale_key, key_to_handle[scale_key].get_tensor(scale_key)).float()
            if target not in scales:
                tensor, scale = dequantize_block_fp8(tensor, scale, block), None
        elif target in scales:
            raise ValueError(f"{key} is {tensor.dtype}, expected float8 like the other experts")
        if target not in params:
            if key.endswith("rotary_emb.inv_freq"):
                continue
            raise ValueError(f"unexpected tensor {key} in {model_dir}")
        param = params[target]
        with torch.no_grad():
            if index is None:
                if param.shape != tensor.shape:
                    raise ValueError(f"{key}: shape {tuple(tensor.shape)} != {tuple(param.shape)}")
                param.data = tensor.to(torch.float32).clone()
            else:
                _, proj = index
                half = param.shape[1] // 2
                for slot in dest_slots:
                    dest = {"gate": param[slot, :half], "up": param[slot, half:]}.get(
                        proj, param[slot]
                    )
                    if dest.shape != tensor.shape:
                        raise ValueError(
                            f"{key}: shape {tuple(tensor.shape)} != {tuple(dest.shape)}"
                        )
                    dest.copy_(tensor)
                    if scale is not None:
                        grid = scales[target][slot]  # gate's blocks, then up's (w13)
                        rows = grid.shape[0] // 2 if proj != "down" else grid.shape[0]
                        grid[
                            {"gate": slice(0, rows), "up": slice(rows, None)}.get(proj, slice(None))
                        ].copy_(scale)
        loaded.add(name)

    if cfg.tie_word_embeddings and "lm_head.weight" not in loaded:
        model.lm_head.data = model.model.embed_tokens.weight.data
        loaded.add("lm_head.weight")
    missing = _expected_keys(model) - loaded
    if missing:
        shown = ", ".join(sorted(_checkpoint_key(k, cfg.num_hidden_layers) for k in missing)[:8])
        raise ValueError(f"checkpoint {model_dir} lacks {len(missing)} tensors, e.g. {shown}")
    return model.place(torch.device(device), dtype)


def _floating(key: str, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, unless its dtype is not floating point (float8 weights are): weights of an
    integer or bool dtype are a broken or foreign checkpoint, not something to cast."""
    if not tensor.dtype.is_floating_point:
        raise ValueError(
            f"{key} is {tensor.dtype}: checkpoint weights (and FP8 scales) must be floating point"
        )
    return tensor


def fp8_experts_keepable(cfg: ModelConfig) -> bool:
    """Whether `cfg`'s routed experts can stay in FP8: an FP8 checkpoint whose expert
    intermediate size is a whole number of scale blocks, so that gate's and up's block rows
    stack into one `w13` scale grid."""
    return (
        cfg.quant is not None
        and bool(cfg.n_routed_experts)
        and cfg.moe_intermediate_size % cfg.quant.weight_block_size[0] == 0
    )


def _expert_scales(model: DeepseekForCausalLM) -> dict[str, torch.Tensor]:
    """Stacked FP8 expert parameter name → its block-scale tensor."""
    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, RoutedExperts) and module.w13_scale is not None:
            assert module.w2_scale is not None
            out[f"{name}.w13"], out[f"{name}.w2"] = module.w13_scale, module.w2_scale
    return out


def _model_key(key: str, num_layers: int, mtp: bool) -> str | None:
    """Checkpoint `key` as the model names it: the MTP module's layer (`num_layers`, the one
    after the main layers) under `mtp.` when `mtp`; None for a tensor not loaded (an MTP
    layer not served, the MTP layer's copies of the embedding and head)."""
    layer = _LAYER_KEY.match(key)
    if layer is None or int(layer.group(1)) < num_layers:
        return key
    if not mtp or int(layer.group(1)) != num_layers:
        return None
    rest = key[layer.end() :]
    if rest.startswith(_MTP_SHARED):
        return None
    return f"mtp.{rest}" if rest.startswith(_MTP_OWN) else f"mtp.block.{rest}"


def _checkpoint_key(name: str, num_layers: int) -> str:
    """The checkpoint's name of model key `name` (`_model_key`'s inverse)."""
    if not name.startswith("mtp."):
        return name
    return f"model.layers.{num_layers}.{name.removeprefix('mtp.').removeprefix('block.')}"


def _target(key: str) -> tuple[str, tuple[int, str] | None]:
    """Model parameter for checkpoint `key`, with (expert, proj) for a stacked expert weight."""
    m = _EXPERT_KEY.match(key)
    if m is None:
        return ("lm_head" if key == "lm_head.weight" else key), None
    prefix, expert, proj = m.group(1), int(m.group(2)), m.group(3)
    return f"{prefix}.{'w2' if proj == 'down' else 'w13'}", (expert, proj)


def _expert_slots(model: DeepseekForCausalLM) -> dict[str, dict[int, list[int]]]:
    """Stacked expert parameter name → logical expert → the slots holding its weights."""
    out: dict[str, dict[int, list[int]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, RoutedExperts):
            by_expert: dict[int, list[int]] = {}
            for slot, expert in enumerate(module.slot_experts):
                by_expert.setdefault(expert, []).append(slot)
            out[f"{name}.w13"] = out[f"{name}.w2"] = by_expert
    return out


def _expected_keys(model: DeepseekForCausalLM) -> set[str]:
    keys: set[str] = set()
    slots = _expert_slots(model)
    for name, _ in model.named_parameters():
        if name in slots:
            prefix = name.rsplit(".", 1)[0]
            projs = ("gate", "up") if name.endswith("w13") else ("down",)
            keys.update(f"{prefix}.{e}.{proj}_proj.weight" for e in slots[name] for proj in projs)
        else:
            keys.add("lm_head.weight" if name == "lm_head" else name)
    return keys


class ExpertReader:
    """Reads single experts' weights from a checkpoint on disk (memory-mapped, FP8
    dequantized): what a rebalance needs when a rank is to host an expert it does not have."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        cfg = ModelConfig.from_dir(self.model_dir)
        self.block = cfg.quant.weight_block_size if cfg.quant else (128, 128)
        self._handles = [
            safe_open(str(f), framework="pt") for f in checkpoint_files(self.model_dir)
        ]
        self._where = {k: h for h in self._handles for k in h.keys()}  # noqa: SIM118

    def _tensor(self, key: str) -> torch.Tensor:
        handle = self._where.get(key)
        if handle is None:
            raise FileNotFoundError(f"{key} is not in the checkpoint {self.model_dir}")
        tensor = _floating(key, handle.get_tensor(key))
        if tensor.dtype in _FP8_DTYPES:
            scale = self._tensor(key + _SCALE_SUFFIX)
            tensor = dequantize_block_fp8(tensor, scale, self.block)
        return tensor

    def read(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`(w13 [2 * I, hidden], w2 [hidden, I])` of `expert` in `layer`, float32."""
        prefix = f"model.layers.{layer}.mlp.experts.{expert}"
        gate = self._tensor(f"{prefix}.gate_proj.weight")
        up = self._tensor(f"{prefix}.up_proj.weight")
        down = self._tensor(f"{prefix}.down_proj.weight")
        return torch.cat((gate, up)).float(), down.float()
