"""C kernels for the CPU path, built on the machine that runs them.

A decode step of a small model on a CPU is bound by per-op overhead and by copies; where one
fused loop over the KV cache replaces several torch ops and a gather, it is written here in C
and compiled at first use with the system's C compiler (`$CC`, else `cc`) for the host's own
instruction set (`-march=native`). The library goes to a cache folder
(`$PDSERVE_KERNEL_CACHE`, default `~/.cache/pdserve/kernels`) under a name made from the
sources, the flags and the CPU, so each node of a cluster builds its own once (~1 s) and
ranks starting together do not race (each writes a temporary file and renames it).

No compiler, a failed build, or `PDSERVE_CPU_KERNELS=0`: `library()` is None and callers use
their plain-torch path (one warning says why). The library is called through `ctypes`, which
releases the GIL for the call. Its parallel loops (OpenMP, when the compiler has it) run on
torch's thread count (`torch.set_num_threads`), with the same results whatever the count.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from workers.model.moe import Routing

log = logging.getLogger(__name__)

SOURCES = ("layer.c", "mla_decode.c", "moe.c", "norm.c", "route.c")
HEADERS = ("gemm.h", "kernels.h", "vec.h")
CFLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-fno-math-errno")
BAD_INDEX, NO_MEMORY = 1, 2


def _cpu_identity() -> str:
    """The CPU model and its feature flags: what `-march=native` compiles for."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(dict.fromkeys(lines))


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "pdserve" / "kernels"
    return Path(os.environ.get("PDSERVE_KERNEL_CACHE", default))


@functools.cache
def _openmp_flags(compiler: str, out_dir: Path | None = None) -> tuple[str, ...]:
    """("-fopenmp",) when `compiler` builds and links an OpenMP program, else () (the kernels'
    parallel loops then run serially). The answer is kept in the kernel cache per compiler
    binary (in `out_dir`, default `cache_dir()`), so a process starting against an
    already-built library compiles nothing."""
    path = shutil.which(compiler)
    if path is None:
        return ()
    st = os.stat(path)
    key = hashlib.sha256(f"{os.path.realpath(path)} {st.st_size} {st.st_mtime_ns}".encode())
    marker = (out_dir or cache_dir()) / f"openmp-{key.hexdigest()[:16]}"
    with contextlib.suppress(OSError):
        known = marker.read_text()
        if known in ("yes", "no"):
            return ("-fopenmp",) if known == "yes" else ()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "omp.c"
        src.write_text("#include <omp.h>\nint f(void) { return omp_get_max_threads(); }\n")
        cmd = [compiler, "-fopenmp", "-fPIC", "-shared", str(src), "-o", str(Path(tmp) / "o.so")]
        try:
            works = subprocess.run(cmd, capture_output=True, timeout=60).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return ()  # not remembered: may work next time
    with contextlib.suppress(OSError):  # written whole or not at all: ranks start together
        marker.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_marker = tempfile.mkstemp(dir=marker.parent)
        with os.fdopen(fd, "w") as f:
            f.write("yes" if works else "no")
        os.replace(tmp_marker, marker)
    return ("-fopenmp",) if works else ()


def build(compiler: str | None = None, out_dir: Path | None = None) -> Path:
    """Compile the kernels into a shared library (or find the one already built) and return
    its path. Raises `RuntimeError` with the compiler's message when the build fails."""
    compiler = compiler or os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler {compiler!r} on PATH")
    out_dir = out_dir or cache_dir()
    flags = (*CFLAGS, *_openmp_flags(compiler, out_dir))
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        digest.update((here / name).read_bytes())
    digest.update(" ".join((compiler, *flags, _cpu_identity())).encode())
    target = out_dir / f"pdserve_cpu_{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    cmd = [compiler, *flags, *(str(here / n) for n in SOURCES), "-o", tmp, "-lm"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr.strip()}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None where they cannot be used here (see the module doc)."""
    if os.environ.get("PDSERVE_CPU_KERNELS", "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(str(build()))
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        log.warning("CPU kernels unavailable, using plain torch: %s", exc)
        return None
    i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    signatures = {
        "pds_mla_decode_f32": ([ptr, ptr, i64, ptr, ptr, i64, i64, i64, i64, i64, i64, f32, ptr],
                               ctypes.c_int),
        "pds_moe_experts_f32": ([ptr, i64, i64, ptr, ptr, i64, ptr, ptr, i64, i64, ptr],
                                ctypes.c_int),
        "pds_rms_norm_f32": ([ptr, i64, ptr, i64, i64, f32, ptr], None),
        "pds_route_noaux_tc_f32": ([ptr, ptr, i64, i64, i64, i64, i64, ctypes.c_int, f32, ptr,
                                    ptr], ctypes.c_int),
        "pds_mla_block_f32": ([ptr, ptr, i64, ptr, ptr, ptr, i64, ptr, i64, ptr, i64, ptr],
                              ctypes.c_int),
        "pds_decode_layers_f32": ([ptr, i64, ptr, i64, ptr, ptr, ptr, i64, ptr, i64, ptr, i64,
                                   ptr], ctypes.c_int),
        "pds_mlp_f32": ([ptr, i64, i64, i64, ptr, ptr, i64, ctypes.c_int, ptr], ctypes.c_int),
        "pds_moe_block_f32": ([ptr, i64, i64, ptr, ptr, i64, i64, i64, i64, ctypes.c_int, f32,
                               ptr, ptr, i64, ptr, ptr, i64, ptr, ptr], ctypes.c_int),
        "pds_set_num_threads": ([ctypes.c_int], ctypes.c_int),
    }  # fmt: skip
    for name, (argtypes, restype) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    return lib


def available() -> bool:
    return library() is not None


_num_threads = [1]  # what the library was last told (pds_set_num_threads)


def _lib() -> ctypes.CDLL:
    """The library, its thread count set to torch's (`torch.set_num_threads`, a rank's
    `--num-threads`): a kernel call uses the threads a torch op would."""
    lib = library()
    if lib is None:
        raise RuntimeError("the CPU kernels are not available on this machine")
    threads = torch.get_num_threads()
    if threads != _num_threads[0]:
        lib.pds_set_num_threads(threads)
        _num_threads[0] = threads
    return lib


def num_threads() -> int:
    """The threads the kernels' parallel loops run on (1 when built without OpenMP)."""
    lib = _lib()
    return int(lib.pds_set_num_threads(_num_threads[0]))


def _check_f32_cpu(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.dtype != torch.float32 or t.device.type != "cpu":
            raise TypeError(f"{name} must be a float32 CPU tensor, got {t.dtype} on {t.device}")


def mla_decode(
    q: torch.Tensor,  # [B, H, kv_lora_rank + rope] float32, absorbed query
    kv_cache: torch.Tensor,  # [num_slots, kv_lora_rank + rope] float32, one layer
    block_table: torch.Tensor,  # [B, max_pages] int32 page ids
    seq_lens: torch.Tensor,  # [B] int32 context lengths (0: padding row, zeros out)
    page_size: int,
    kv_lora_rank: int,
    scale: float,
) -> torch.Tensor:
    """Paged absorbed-MLA decode attention (the contract of `workers.kernels.mla_decode`) on
    CPU tensors in float32: `[B, H, kv_lora_rank]`. Raises `RuntimeError` if the library is
    not available, `ValueError` on a page id outside the cache."""
    lib = _lib()
    num_reqs, num_heads, dim = q.shape
    _check_f32_cpu(q=q, kv_cache=kv_cache)
    if kv_cache.shape[-1] != dim:
        raise ValueError(f"q and kv_cache differ in their last dimension: {dim}, {kv_cache.shape}")
    q = q.contiguous()
    kv_cache = kv_cache.contiguous()  # a layer of the engine's cache already is
    block_table = block_table.to(torch.int32).contiguous()
    seq_lens = seq_lens.to(torch.int32).contiguous()
    out = q.new_empty(num_reqs, num_heads, kv_lora_rank)
    status = lib.pds_mla_decode_f32(
        q.data_ptr(), kv_cache.data_ptr(), kv_cache.shape[0], block_table.data_ptr(),
        seq_lens.data_ptr(), num_reqs, num_heads, dim, kv_lora_rank, block_table.shape[1],
        page_size, scale, out.data_ptr(),
    )  # fmt: skip
    _raise_for(status, "mla_decode", "block_table holds a page id outside the KV cache")
    return out


def moe_experts(
    x: torch.Tensor,  # [T, hidden] float32
    topk_ids: torch.Tensor,  # [T, top_k] int64 expert ids in [0, E)
    topk_weights: torch.Tensor,  # [T, top_k] float32
    w13t: torch.Tensor,  # [E, hidden, 2 * inter] float32, contiguous (gate columns, then up)
    w2t: torch.Tensor,  # [E, inter, hidden] float32, contiguous
) -> torch.Tensor:
    """Routed experts of a MoE layer, the weighted sum per token: `[T, hidden]` (see
    `moe.c`). The weights are the transposes of `RoutedExperts.w13` / `w2`; raises
    `ValueError` on an expert id outside `[0, E)`."""
    lib = _lib()
    _check_f32_cpu(x=x, w13t=w13t, w2t=w2t)
    num_experts, hidden, two_inter = w13t.shape
    if not (w13t.is_contiguous() and w2t.is_contiguous()):
        raise ValueError("w13t and w2t must be contiguous")
    if w2t.shape != (num_experts, two_inter // 2, hidden) or x.shape[-1] != hidden:
        raise ValueError(f"shapes do not match: x {x.shape}, w13t {w13t.shape}, w2t {w2t.shape}")
    x = x.contiguous()
    ids = topk_ids.to(torch.int64).contiguous()
    weights = topk_weights.to(torch.float32).contiguous()
    out = torch.empty_like(x)
    status = lib.pds_moe_experts_f32(
        x.data_ptr(), x.shape[0], hidden, ids.data_ptr(), weights.data_ptr(), ids.shape[1],
        w13t.data_ptr(), w2t.data_ptr(), num_experts, two_inter // 2, out.data_ptr(),
    )  # fmt: skip
    _raise_for(status, "moe_experts", f"an expert id is outside [0, {num_experts})")
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`x / sqrt(mean(x^2, -1) + eps) * weight` over the last dimension, float32; rows of `x`
    may be strided (a split's view), its last dimension must be dense."""
    lib = _lib()
    _check_f32_cpu(x=x, weight=weight)
    dim = x.shape[-1]
    if weight.shape != (dim,):
        raise ValueError(f"weight {tuple(weight.shape)} does not match x {tuple(x.shape)}")
    weight = weight.contiguous()
    rows = x.reshape(-1, dim) if x.dim() != 2 else x
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(x.shape, dtype=torch.float32)
    lib.pds_rms_norm_f32(
        rows.data_ptr(), rows.stride(0), weight.data_ptr(), rows.shape[0], dim, eps,
        out.data_ptr(),
    )  # fmt: skip
    return out


def route_noaux_tc(
    logits: torch.Tensor,  # [T, E] float32 router logits
    bias: torch.Tensor,  # [E] float32 e_score_correction_bias
    num_groups: int,
    topk_group: int,
    top_k: int,
    norm_topk_prob: bool,
    scaling: float,
) -> Routing:
    """DeepSeek-V3's `noaux_tc` routing from the router's logits (see `route.c`); the
    experts of a token come in descending order of their biased score."""
    from workers.model.moe import Routing  # that module imports this one

    lib = _lib()
    _check_f32_cpu(logits=logits, bias=bias)
    num_tokens, num_experts = logits.shape
    if bias.shape != (num_experts,) or num_experts % num_groups or not 0 < top_k <= num_experts:
        raise ValueError(
            f"bad routing shapes: logits {tuple(logits.shape)}, bias {tuple(bias.shape)}, "
            f"{num_groups} groups, top-{top_k}"
        )
    logits, bias = logits.contiguous(), bias.contiguous()
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64)
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32)
    status = lib.pds_route_noaux_tc_f32(
        logits.data_ptr(), bias.data_ptr(), num_tokens, num_experts, num_groups, topk_group,
        top_k, int(norm_topk_prob), scaling, ids.data_ptr(), weights.data_ptr(),
    )  # fmt: skip
    _raise_for(status, "route_noaux_tc", "")
    return Routing(ids, weights)


def _raise_for(status: int, kernel: str, bad_index: str) -> None:
    if status == BAD_INDEX:
        raise ValueError(f"{kernel}: {bad_index}")
    if status == NO_MEMORY:
        raise MemoryError(f"{kernel}: out of memory for its buffers")
