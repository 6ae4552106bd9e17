"""Numerics against Hugging Face `transformers`: prefill logits and greedy tokens, per config."""

from __future__ import annotations

import pytest
import torch

from tests.checkpoints import PARITY_CONFIGS, make_checkpoint
from workers.engine.config import EngineConfig
from workers.engine.engine import Engine
from workers.engine.messages import GenerateRequest, SamplingParams

transformers = pytest.importorskip("transformers")

PROMPT_LENS = (3, 9, 17, 40)
NUM_NEW = 32


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


def _run_engine(model_dir, prompts, **engine_kwargs):
    """Greedy outputs and the logits of every step, per request."""
    cfg = EngineConfig(**{"page_size": 4, "chunked_prefill_size": 24, **engine_kwargs})
    engine = Engine(model_dir, cfg, progress=False)
    greedy = SamplingParams(max_new_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add(GenerateRequest(f"r{i}", p, greedy))
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    logits: dict[str, list[torch.Tensor]] = {f"r{i}": [] for i in range(len(prompts))}
    while engine.has_work:
        for d in engine.step():
            tokens[d.rid] += d.token_ids
            logits[d.rid].append(engine.last_logits[d.rid].cpu().clone())
    assert engine.kv.allocator.num_free == engine.kv.num_pages
    return engine, tokens, logits


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(PARITY_CONFIGS))
def test_matches_transformers(name, tmp_path_factory):
    ckpt = make_checkpoint(name, tmp_path_factory.mktemp(name))
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt.hf_path, dtype=torch.float32)
    hf.eval()
    engine, tokens, logits = _run_engine(ckpt.path, _prompts(hf.config.vocab_size))
    for i, prompt in enumerate(_prompts(hf.config.vocab_size)):
        rid = f"r{i}"
        with torch.no_grad():
            ref_ids = hf.generate(
                torch.tensor([prompt]),
                max_new_tokens=NUM_NEW,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )[0, len(prompt) :].tolist()
            full = torch.tensor([prompt + tokens[rid]])
            ref_logits = hf(full).logits[0]
        assert tokens[rid] == ref_ids, f"{name} prompt {i}: greedy tokens differ"
        # Step 0 is the prefill; later steps are absorbed-MLA decodes over the paged cache.
        assert _rel_err(logits[rid][0], ref_logits[len(prompt) - 1]) < 1e-4
        for step in range(1, NUM_NEW):
            pos = len(prompt) - 1 + step
            assert _rel_err(logits[rid][step], ref_logits[pos]) < 1e-4, (name, i, step)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("swap", [4.0, 0.0], ids=["swap", "recompute"])
def test_chunking_paging_and_preemption_do_not_change_tokens(tmp_path_factory, swap):
    """Tiny pages, tiny chunks and a KV cache too small for all requests at once (forcing
    queueing and preemption) give the same greedy tokens as a roomy configuration, whether a
    preempted request's KV waits in host memory (`--kv-swap-space`) or is computed again."""
    ckpt = make_checkpoint("v3_qlora_groups", tmp_path_factory.mktemp("chunk"))
    prompts = _prompts(256)
    _, roomy, _ = _run_engine(ckpt.path, prompts, page_size=16, chunked_prefill_size=4096)
    engine, tight, _ = _run_engine(
        ckpt.path, prompts, page_size=2, chunked_prefill_size=7, kv_capacity_tokens=80,
        kv_swap_space=swap,
    )  # fmt: skip
    assert tight == roomy
    assert engine.scheduler.num_preemptions > 0  # the small cache really forced preemption
    swapped = engine.stats().num_swapped_out
    assert swapped == (engine.scheduler.num_preemptions if swap else 0)
    assert engine.stats().num_swapped_tokens == 0  # nothing left behind in host memory


def _engine_outputs(engine: Engine, prompts: list[list[int]], sampling: SamplingParams):
    """Every prompt's output ids and logprobs (when asked), all run as one batch."""
    for i, p in enumerate(prompts):
        engine.add(GenerateRequest(f"q{i}", p, sampling))
    tokens: dict[str, list[int]] = {f"q{i}": [] for i in range(len(prompts))}
    logprobs: dict[str, list] = {f"q{i}": [] for i in range(len(prompts))}
    while engine.has_work:
        for d in engine.step():
            tokens[d.rid] += d.token_ids
            logprobs[d.rid] += d.logprobs or []
    return [tokens[f"q{i}"] for i in range(len(prompts))], [
        logprobs[f"q{i}"] for i in range(len(prompts))
    ]


@pytest.mark.timeout(300)
def test_penalties_min_new_tokens_and_logprobs_match_transformers(tmp_path_factory):
    """Greedy with a repetition penalty, and with a minimum length that keeps a likely stop
    token out, against `generate`'s own logits processors; logprobs against the log-softmax
    of transformers' logits over the whole sequence."""
    ckpt = make_checkpoint("v3_qlora_groups", tmp_path_factory.mktemp("penalties"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt.hf_path, dtype=torch.float32)
    hf.eval()
    prompts = [p + p for p in _prompts(hf.config.vocab_size)]  # repeats for the penalty
    engine = Engine(ckpt.path, EngineConfig(page_size=4, chunked_prefill_size=24), progress=False)

    def hf_generate(prompt: list[int], **kwargs) -> list[int]:
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([prompt]), do_sample=False, pad_token_id=0,
                max_new_tokens=NUM_NEW, **kwargs,
            )  # fmt: skip
        return out[0, len(prompt) :].tolist()

    plain = [hf_generate(p, eos_token_id=None) for p in prompts]
    penalized = [hf_generate(p, eos_token_id=None, repetition_penalty=1.8) for p in prompts]
    assert penalized != plain  # the penalty really changes the output
    rep = SamplingParams(
        max_new_tokens=NUM_NEW, temperature=0.0, ignore_eos=True, repetition_penalty=1.8,
        logprobs=True, top_logprobs=4,
    )  # fmt: skip
    got, logprobs = _engine_outputs(engine, prompts, rep)
    assert got == penalized

    # Logprobs are the model's, before the penalty: transformers' raw logits.
    for prompt, out, lps in zip(prompts, got, logprobs, strict=True):
        assert len(lps) == len(out)
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([prompt + out])).logits[0].double(), -1)
        for step, (token, lp) in enumerate(zip(out, lps, strict=True)):
            row = ref[len(prompt) - 1 + step]
            assert lp.logprob == pytest.approx(float(row[token]), abs=1e-3)
            want_top = torch.topk(row, 4)
            assert [t for t, _ in lp.top] == want_top.indices.tolist()
            assert [v for _, v in lp.top] == pytest.approx(want_top.values.tolist(), abs=1e-3)

    # A stop token the plain greedy output hits early; with min_new_tokens it cannot end
    # the output before that many tokens.
    for prompt, ref_plain in zip(prompts, plain, strict=True):
        stop = ref_plain[1]
        want = hf_generate(prompt, eos_token_id=stop, min_new_tokens=6)
        assert len(want) > 2  # the ban moved the end
        minimum = SamplingParams(
            max_new_tokens=NUM_NEW, temperature=0.0, ignore_eos=True, stop_token_ids=(stop,),
            min_new_tokens=6,
        )  # fmt: skip
        (ours,), _ = _engine_outputs(engine, [prompt], minimum)
        assert ours == want
    assert engine.kv.allocator.num_free == engine.kv.num_pages


@pytest.mark.timeout(300)
def test_prompt_logprobs_match_transformers_across_chunks(tmp_path_factory):
    """A prompt scored in several prefill chunks, beside others: each prompt token's logprob
    is transformers' log-softmax at the position before it."""
    ckpt = make_checkpoint("v3_qlora_groups", tmp_path_factory.mktemp("prompt_logprobs"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt.hf_path, dtype=torch.float32)
    hf.eval()
    prompts = _prompts(hf.config.vocab_size)
    engine = Engine(ckpt.path, EngineConfig(page_size=4, chunked_prefill_size=24), progress=False)
    scoring = SamplingParams(
        max_new_tokens=2, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=3,
        prompt_logprobs=True,
    )  # fmt: skip
    plain = SamplingParams(max_new_tokens=2, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add(GenerateRequest(f"s{i}", p, scoring))
        engine.add(GenerateRequest(f"p{i}", p, plain))  # same prompt: no cache for s{i}
    got: dict[str, list] = {}
    while engine.has_work:
        for d in engine.step():
            if d.prompt_logprobs is not None:
                assert d.rid not in got, "prompt logprobs come once, with the first token"
                got[d.rid] = d.prompt_logprobs
    assert sorted(got) == [f"s{i}" for i in range(len(prompts))]
    for i, p in enumerate(prompts):
        scored = got[f"s{i}"]
        assert len(scored) == len(p) and scored[0] is None
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([p])).logits[0].double(), -1)
        for pos in range(1, len(p)):
            lp, row = scored[pos], ref[pos - 1]
            assert lp.logprob == pytest.approx(float(row[p[pos]]), abs=1e-3), (i, pos)
            assert [t for t, _ in lp.top] == torch.topk(row, 3).indices.tolist()
    assert engine.kv.allocator.num_free == engine.kv.num_pages
