"""The engine with its CUDA-path kernels (Triton MLA decode, fused MoE, FP8 experts, the
static decode buffers) against the plain torch engine. Without CUDA the kernels run under
Triton's interpreter (set by conftest), so this checks how the model drives them — shapes,
strides, dtypes, padding — on every CI run; `test_gpu.py` covers the real device."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from tests.checkpoints import make_checkpoint  # noqa: E402
from tests.test_cuda_graph import _engine, _run  # noqa: E402
from tests.test_parity import _prompts, _rel_err  # noqa: E402
from workers.engine import engine as engine_module  # noqa: E402
from workers.engine.cuda_graph import DecodeGraphs  # noqa: E402
from workers.engine.kv_cache import pages_needed  # noqa: E402
from workers.kernels import kernels_usable  # noqa: E402
from workers.model.mla import MLAttention  # noqa: E402
from workers.model.moe import RoutedExperts  # noqa: E402

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        not kernels_usable(torch.device("cpu")) and not torch.cuda.is_available(),
        reason="Triton kernels need CUDA or TRITON_INTERPRET=1",
    ),
]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _use_kernels(engine) -> None:
    for module in engine.model.modules():
        if isinstance(module, MLAttention):
            module.decode_backend = "triton"
        elif isinstance(module, RoutedExperts):
            module.backend = "triton"


def _assert_same(tokens, logits, ref_tokens, ref_logits, bound: float) -> None:
    assert tokens == ref_tokens
    for rid, steps in ref_logits.items():
        for ref, ours in zip(steps, logits[rid], strict=True):
            assert _rel_err(ours, ref) < bound


@pytest.mark.parametrize("graphs", [False, True])
def test_engine_with_triton_kernels_matches_torch(tmp_path_factory, graphs: bool) -> None:
    ckpt = make_checkpoint("v3_qlora_groups", tmp_path_factory.mktemp("kernels"))
    prompts = _prompts(256)[:3]
    ref_tokens, ref_logits = _run(_engine(ckpt.path, "cpu", 0), prompts)

    engine = _engine(ckpt.path, DEVICE, 0)
    _use_kernels(engine)
    if graphs:
        engine.graphs = DecodeGraphs(
            engine.model, engine.kv, 4,
            pages_needed(engine.max_context_len, engine.kv.page_size), engine.expert_load,
            capture=engine.device.type == "cuda",
        )  # fmt: skip
        engine.graphs.capture()
    tokens, logits = _run(engine, prompts)
    # fp32 throughout; the kernels sum in another order than torch's bmm.
    _assert_same(tokens, logits, ref_tokens, ref_logits, 1e-4)


def test_fp8_experts_kept_match_dequantized(tmp_path_factory, monkeypatch) -> None:
    """Experts held in FP8 and scaled tile by tile inside the fused kernel give what the
    weights dequantized at load give, to float32 rounding."""
    ckpt = make_checkpoint("v3_fp8_b16", tmp_path_factory.mktemp("fp8"))
    prompts = _prompts(256)[:3]
    ref_tokens, ref_logits = _run(_engine(ckpt.path, "cpu", 0), prompts)

    load = engine_module.load_model

    def load_keeping_fp8(*args, **kwargs):  # the engine keeps FP8 on sm89+ GPUs only
        return load(*args, **{**kwargs, "keep_fp8_experts": True})

    monkeypatch.setattr(engine_module, "load_model", load_keeping_fp8)
    engine = _engine(ckpt.path, DEVICE, 0)
    experts = [m for m in engine.model.modules() if isinstance(m, RoutedExperts)]
    assert experts and all(m.is_fp8 and m.backend == "triton" for m in experts)
    _use_kernels(engine)
    tokens, logits = _run(engine, prompts)
    _assert_same(tokens, logits, ref_tokens, ref_logits, 1e-4)


@pytest.mark.parametrize("layout", ["contiguous", "masked"])
def test_expert_parallel_layouts_through_the_fused_kernel(layout: str) -> None:
    """An EP rank's expert step on CUDA (`_fused`) gives the torch layouts' outputs on every
    real row, for both dispatcher layouts."""
    from workers.ep.dispatch import DispatchResult
    from workers.ep.experts import _contiguous, _fused, _masked

    g = torch.Generator().manual_seed(0)
    num_slots, hidden, inter = 3, 32, 24
    w13 = torch.randn(num_slots, 2 * inter, hidden, generator=g) / hidden**0.5
    w2 = torch.randn(num_slots, hidden, inter, generator=g) / inter**0.5
    counts = torch.tensor([4, 0, 3])
    if layout == "masked":
        x = torch.randn(num_slots, 5, hidden, generator=g)
        ref = _masked(x, w13, w2)
    else:
        x = torch.randn(int(counts.sum()), hidden, generator=g)
        ref = _contiguous(x, counts, w13, w2)
    result = DispatchResult(x=x, num_tokens_per_expert=counts, layout=layout, handle=None)  # type: ignore[arg-type]
    ours = _fused(x, result, w13, w2)
    assert ours.shape == ref.shape
    if layout == "masked":
        for slot, n in enumerate(counts.tolist()):
            torch.testing.assert_close(ours[slot, :n], ref[slot, :n], rtol=1e-4, atol=1e-5)
    else:
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
