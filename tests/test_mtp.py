"""Speculative decoding with the MTP module as the draft model (`--speculative-mtp`).

The module's guesses are checked against a reference built on `transformers`: the main
model's hidden states from its DeepSeek-V3 model, the module's decoder layer run as one more
`DeepseekV3DecoderLayer` over the whole token history, the module's own parts in plain torch.
An engine's guess after each step — chunked prompts, pages, one engine or a prefill and a
decode engine with the KV copied between them — must be the reference's choice at that
position. Then: guesses never change the tokens (a random module, and one that agrees with
its model: nearly every guess kept), the settings are checked, and a disaggregated server
guesses with it over HTTP.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.checkpoints import agreeing_mtp_checkpoint, make_checkpoint
from tests.test_disagg_engine import _copy_pages
from tests.test_speculative import GUESSING, _run, static_graphs
from workers.engine.config import EngineConfig
from workers.engine.engine import Engine
from workers.engine.messages import GenerateRequest, SamplingParams

pytestmark = pytest.mark.timeout(300)

GREEDY = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)


def _engine(path: Path, **kw: Any) -> Engine:
    config = {"page_size": 4, "chunked_prefill_size": 8, "speculative_mtp": 1, **kw}
    return Engine(path, EngineConfig(**config), progress=False)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 900, (n,), generator=g).tolist() for n in (5, 13, 30)]


class MTPReference:
    """The MTP module's logits over a whole token history, from `transformers`."""

    def __init__(self, model_dir: Path, tmp: Path):
        import transformers
        from safetensors.torch import load_file

        config = json.loads((model_dir / "config.json").read_text())
        self.num_layers = n = config["num_hidden_layers"]
        # The module's decoder layer is layer `n` of a model of n + 1 layers.
        ref = tmp / "mtp-reference"
        ref.mkdir()
        for f in model_dir.iterdir():
            if f.name != "config.json":
                (ref / f.name).symlink_to(f)
        (ref / "config.json").write_text(json.dumps({**config, "num_hidden_layers": n + 1}))
        self.hf = transformers.AutoModelForCausalLM.from_pretrained(
            ref, dtype=torch.float32, attn_implementation="eager"
        )
        prefix = f"model.layers.{n}."
        weights = load_file(model_dir / "model.safetensors")
        self.own = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        self.eps = self.hf.config.rms_norm_eps

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return self.own[name] * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def _inputs(self, token: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The decoder layer's input for rows reading `token` and `hidden`."""
        embed = self.hf.model.embed_tokens(token)
        x = torch.cat((self._norm(embed, "enorm.weight"), self._norm(hidden, "hnorm.weight")), -1)
        return x @ self.own["eh_proj.weight"].T

    def _layer(self, x: torch.Tensor) -> torch.Tensor:
        """The module's decoder layer over rows at positions 0 .., causal."""
        model, n = self.hf.model, x.shape[0]
        positions = torch.arange(n)[None]
        causal = torch.full((n, n), float("-inf")).triu(1)[None, None]
        y = model.layers[self.num_layers](
            x[None], attention_mask=causal, position_ids=positions,
            position_embeddings=model.rotary_emb(x[None], positions),
        )  # fmt: skip
        return (y[0] if isinstance(y, tuple) else y)[0]

    @torch.no_grad()
    def rows(self, tokens: list[int]) -> torch.Tensor:
        """The layer's inputs over a whole history: row `i` reads the main model's final
        hidden state of token `i` and token `i + 1`."""
        model = self.hf.model
        out = model(input_ids=torch.tensor([tokens]), output_hidden_states=True)
        hidden = model.norm(out.hidden_states[self.num_layers])[0]  # after the main layers
        return self._inputs(torch.tensor(tokens[1:]), hidden[:-1])

    @torch.no_grad()
    def guess_logits(self, rows: torch.Tensor, guesses: list[int]) -> list[torch.Tensor]:
        """The module's logits for each of `guesses` after the history whose layer inputs
        are `rows`: the first from the last row, each next one from a row that reads the
        guess before it and the module's own (normed) hidden state of the row before."""
        out = []
        for guess in guesses:
            y = self._layer(rows)
            last = self._norm(y[-1], "shared_head.norm.weight")
            out.append(last @ self.own["shared_head.head.weight"].T)
            rows = torch.cat((rows, self._inputs(torch.tensor([guess]), last[None])))
        return out


@pytest.fixture(scope="module")
def mtp_model(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with random weights in the norms the MTP path reads (the final norm,
    `enorm`, `hnorm`, the module's head norm), which the tiny model has at 1."""
    from safetensors.torch import load_file, save_file

    path = tmp_path_factory.mktemp("mtp-model")
    for f in tiny_model_dir.iterdir():
        if f.name != "model.safetensors":
            (path / f.name).symlink_to(f)
    weights = load_file(tiny_model_dir / "model.safetensors")
    g = torch.Generator().manual_seed(7)
    num_layers = json.loads((tiny_model_dir / "config.json").read_text())["num_hidden_layers"]
    own = ("enorm.weight", "hnorm.weight", "shared_head.norm.weight")
    for name in ("model.norm.weight", *(f"model.layers.{num_layers}.{n}" for n in own)):
        weights[name] = 1 + 0.5 * torch.randn(weights[name].shape, generator=g)
    save_file(weights, str(path / "model.safetensors"))
    return path


@pytest.fixture(scope="module")
def reference(mtp_model, tmp_path_factory) -> MTPReference:
    return MTPReference(mtp_model, tmp_path_factory.mktemp("mtp"))


def _record_guesses(engine: Engine, guesses: dict[str, dict[int, list[int]]]) -> None:
    """Each live request's guesses after the step just run, by its number of tokens."""
    for rid, seq in engine.requests.items():
        if seq.mtp_draft:
            guesses.setdefault(rid, {})[seq.num_tokens] = list(seq.mtp_draft)


def _check_guesses(
    reference: MTPReference,
    tokens: dict[str, list[int]],
    guesses: dict[str, dict[int, list[int]]],
    num_guesses: int = 1,
) -> None:
    """Every guess is the reference's choice (within float noise of its best score), each
    request guessing `num_guesses` tokens most steps (fewer where its pages end)."""
    assert set(guesses) == set(tokens)
    for rid, by_len in guesses.items():
        rows = reference.rows(tokens[rid])
        assert len(by_len) >= GREEDY.max_new_tokens // (2 * num_guesses), (rid, by_len)
        lengths = [len(g) for g in by_len.values()]
        assert max(lengths) == num_guesses and sum(lengths) > 0.6 * num_guesses * len(lengths)
        for num_tokens, guess in by_len.items():
            # From the row of the token before the pending one.
            logits = reference.guess_logits(rows[: num_tokens - 1], guess)
            for i, (row, token) in enumerate(zip(logits, guess, strict=True)):
                assert row[token] >= row.max() - 1e-3, (rid, num_tokens, i, guess)


@pytest.mark.parametrize("num_guesses", [1, 3])
def test_the_guesses_are_the_mtp_module_s_choices(num_guesses, mtp_model, reference):
    """One engine, prompts in chunks of 8 over pages of 4, greedy requests decoding in one
    batch: after each step each request's guesses are the reference module's choices — the
    first over the request's history, each next one over that and the guesses before it."""
    engine = _engine(mtp_model, speculative_mtp=num_guesses)
    prompts = _prompts()
    for i, prompt in enumerate(prompts):
        engine.add(GenerateRequest(f"r{i}", prompt, GREEDY))
    guesses: dict[str, dict[int, list[int]]] = {}
    tokens: dict[str, list[int]] = {}
    while engine.has_work:
        engine.step()
        _record_guesses(engine, guesses)
        tokens.update({rid: list(seq.token_ids) for rid, seq in engine.requests.items()})
    assert engine.kv.allocator.num_free == engine.kv.num_pages
    _check_guesses(reference, tokens, guesses, num_guesses)


@pytest.mark.parametrize("num_guesses", [1, 3])
def test_a_decode_engine_guesses_from_the_module_kv_the_prefill_engine_computed(
    num_guesses, mtp_model, reference
):
    """Disaggregated: the prefill engine runs the module over the prompt (its last row reads
    the first sampled token) and the pages carry the module's KV as one more layer; its
    guesses after the first token go with them (`admit_received`'s `guesses`), so the decode
    engine's first step guesses too. Every guess, the prefill's and the decode's from then
    on, is the reference's."""
    prefill = _engine(mtp_model, speculative_mtp=num_guesses)
    decode = _engine(mtp_model, speculative_mtp=num_guesses)
    assert prefill.kv.data.shape[0] == prefill.model_config.num_hidden_layers + 1
    prompts = _prompts()
    for i, prompt in enumerate(prompts):
        prefill.add(GenerateRequest(f"r{i}", prompt, GREEDY), mode="prefill")
        decode.add(GenerateRequest(f"r{i}", prompt, GREEDY), mode="decode")
    handed: dict[str, tuple[list[int], int, list[int]]] = {}
    targets: dict[str, list[int]] = {}
    guesses: dict[str, dict[int, list[int]]] = {}
    tokens: dict[str, list[int]] = {}
    finished = 0
    while finished < len(prompts):
        prefill.step()
        for seq in prefill.take_handoffs():
            handed[seq.rid] = (seq.pages, seq.token_ids[-1], list(seq.mtp_draft))
        finished += sum(d.finish_reason is not None for d in decode.step())
        _record_guesses(decode, guesses)
        tokens.update({rid: list(seq.token_ids) for rid, seq in decode.requests.items()})
        for seq in decode.take_reserved():
            targets[seq.rid] = seq.pages
        for rid in [r for r in handed if r in targets]:
            (pages, first, sent), dst_pages = handed.pop(rid), targets.pop(rid)
            _copy_pages(prefill, pages, decode, dst_pages)
            prefill.release(rid)
            assert decode.admit_received(rid, first, guesses=sent) is not None
            assert 1 <= len(sent) <= num_guesses
            assert decode.requests[rid].mtp_draft == sent  # the first step reads them
            guesses.setdefault(rid, {})[decode.requests[rid].num_tokens] = sent
    _check_guesses(reference, tokens, guesses, num_guesses)
    for engine in (prefill, decode):
        assert engine.kv.allocator.num_free == engine.kv.num_pages and not engine.requests


def test_guesses_hold_through_preemption_swap_and_recompute(mtp_model, reference):
    """On a cache too small for the batch — requests preempted, their KV swapped to host
    memory and back or recomputed — the tokens are a roomy engine's, and the guesses still
    the reference module's: its KV layer moves and is recomputed with the rest."""
    reqs = {f"r{i}": (p, GREEDY) for i, p in enumerate(_prompts() * 2)}
    reqs = {rid: (p + [i], sp) for i, (rid, (p, sp)) in enumerate(reqs.items())}
    roomy, _, _ = _run(_engine(mtp_model, speculative_mtp=0), reqs)
    for swap in (0.0, 0.001):
        tight = _engine(mtp_model, kv_capacity_tokens=128, kv_swap_space=swap)
        guesses: dict[str, dict[int, list[int]]] = {}
        tokens: dict[str, list[int]] = {}
        for rid, (prompt, sp) in reqs.items():
            tight.add(GenerateRequest(rid, prompt, sp))
        got: dict[str, list[int]] = {rid: [] for rid in reqs}
        while tight.has_work:
            for d in tight.step():
                got[d.rid] += d.token_ids
            _record_guesses(tight, guesses)
            tokens.update({rid: list(seq.token_ids) for rid, seq in tight.requests.items()})
        assert got == roomy
        assert tight.scheduler.num_preemptions > 0
        if swap:
            assert tight.stats().num_swapped_out > 0
        assert tight.kv.allocator.num_free == tight.kv.num_pages
        _check_guesses(reference, tokens, guesses)


def test_constrained_requests_guess_with_the_mtp_module(tiny_model_dir):
    """JSON-schema and regex requests, greedy and sampled: the text their constraint forces
    is the guess where there is one, else the module's; the tokens are plain decoding's."""
    from tests.test_structured_output import ANSWER, SCHEMA
    from workers.engine.messages import OutputConstraint

    schema = OutputConstraint("json_schema", json.dumps(SCHEMA))
    reqs = {
        "schema": ([10, 20, 30], schema, 0.0, None),
        "schema-sampled": ([11, 20, 30], schema, 0.8, 3),
        "regex": ([7, 8, 9], OutputConstraint("regex", ANSWER), 0.0, None),
    }
    requests = {
        rid: (
            prompt,
            SamplingParams(max_new_tokens=200, temperature=t, seed=seed, constraint=c),
        )  # fmt: skip
        for rid, (prompt, c, t, seed) in reqs.items()
    }
    plain, plain_finish, _ = _run(_engine(tiny_model_dir, speculative_mtp=0), requests)
    engine = _engine(tiny_model_dir)
    got, finish, _ = _run(engine, requests)
    assert got == plain and finish == plain_finish
    stats = engine.stats()
    assert stats.num_spec_accepted_tokens > 0  # the forced text


@pytest.fixture(scope="module")
def agreeing(tiny_model_dir, tmp_path_factory) -> Path:
    return agreeing_mtp_checkpoint(tiny_model_dir, tmp_path_factory.mktemp("agreeing"))


def _requests() -> dict[str, tuple[list[int], SamplingParams]]:
    prompts = _prompts()
    reqs = {f"g{i}": (p, GREEDY) for i, p in enumerate(prompts)}
    for i, (name, sp) in enumerate(GUESSING.items()):
        reqs[name] = (prompts[i % 3], sp)
    return reqs


@pytest.mark.parametrize(("model", "num_guesses"), [("tiny", 1), ("agreeing", 1), ("agreeing", 3)])
def test_mtp_guesses_give_the_tokens_of_plain_decoding(
    model, num_guesses, tiny_model_dir, agreeing
):
    """Greedy and seeded sampled requests of every kind (penalties, logprobs, a minimum
    length, ...) in one batch give plain decoding's tokens, with the tiny model's random
    module (its guesses fail) and with one that agrees with its model (its guesses hold for
    greedy requests: half the decode steps with one guess a step, a quarter with 3)."""
    path = tiny_model_dir if model == "tiny" else agreeing
    reqs = _requests()
    plain, _, _ = _run(_engine(path, speculative_mtp=0), reqs)
    engine = _engine(path, speculative_mtp=num_guesses)
    spec, _, _ = _run(engine, reqs)
    assert spec == plain
    stats = engine.stats()
    assert stats.num_spec_draft_tokens > 0
    greedy = {k: v for k, v in reqs.items() if k.startswith("g")}
    engine = _engine(path, speculative_mtp=num_guesses, chunked_prefill_size=64)
    plain_steps = _run(_engine(path, speculative_mtp=0, chunked_prefill_size=64), greedy)[2]
    _, _, steps = _run(engine, greedy)
    stats = engine.stats()
    if model == "agreeing":
        assert stats.num_spec_accepted_tokens == stats.num_spec_draft_tokens > 0
        # One prefill step, then 23 decode steps without guesses; 1 + num_guesses tokens a
        # step with (a step whose guesses would need a page past the free reserve guesses
        # fewer).
        assert plain_steps == 24
        assert steps <= 2 + math.ceil(23 / (1 + num_guesses)), steps
    else:
        assert stats.num_spec_accepted_tokens < stats.num_spec_draft_tokens / 4


def _recording(engine: Engine) -> list[dict[str, list[int]]]:
    """Every request's guesses after each step of `engine`, from now on."""
    drafts: list[dict[str, list[int]]] = []
    step = engine.step

    def recorded(*a: Any, **kw: Any) -> Any:
        out = step(*a, **kw)
        drafts.append({r: list(q.mtp_draft) for r, q in engine.requests.items()})
        return out

    engine.step = recorded  # type: ignore[method-assign]
    return drafts


@pytest.mark.parametrize(("model", "num_guesses"), [("tiny", 1), ("agreeing", 2)])
def test_mtp_guesses_through_the_decode_graphs_static_buffers_match_eager(
    model, num_guesses, tiny_model_dir, agreeing
):
    """Decode steps through `DecodeGraphs` (its static-buffer path, run eagerly on CPU as
    on CUDA it is captured): the module reads the graph's hidden states and inputs, and
    every request gets the tokens and the guesses of the eager engine."""
    path = tiny_model_dir if model == "tiny" else agreeing
    reqs = _requests()

    eager = _engine(path, speculative_mtp=num_guesses, chunked_prefill_size=64)
    want_drafts = _recording(eager)
    want, _, want_steps = _run(eager, reqs)
    engine = _engine(path, speculative_mtp=num_guesses, chunked_prefill_size=64)
    drafts = _recording(engine)
    rows = static_graphs(engine)
    got, _, steps = _run(engine, reqs)
    assert len(rows) >= 10 and max(rows) > len(reqs), rows  # decode steps, with guess rows
    assert got == want and steps == want_steps
    assert drafts == want_drafts  # the module's guesses, step by step
    ours, theirs = engine.stats(), eager.stats()
    assert ours.num_spec_draft_tokens == theirs.num_spec_draft_tokens > 0
    assert ours.num_spec_accepted_tokens == theirs.num_spec_accepted_tokens


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mtp_guesses_through_captured_cuda_graphs_match_eager(tiny_model_dir):
    reqs = _requests()
    kw = {"speculative_mtp": 2, "chunked_prefill_size": 64, "device": "cuda"}
    eager = _engine(tiny_model_dir, cuda_graph_max_batch=0, **kw)
    want_drafts = _recording(eager)
    want, _, _ = _run(eager, reqs)
    engine = _engine(tiny_model_dir, cuda_graph_max_batch=32, **kw)
    assert engine.graphs is not None and engine.graphs.hidden, "graphs captured with hidden"
    drafts = _recording(engine)
    got, _, _ = _run(engine, reqs)
    assert got == want
    same = sum(a == b for a, b in zip(drafts, want_drafts, strict=False))
    assert same >= 0.95 * len(want_drafts), (same, len(want_drafts))
    assert engine.stats().num_spec_draft_tokens > 0


def test_guesses_stop_at_the_context_and_the_length_limit(agreeing):
    """Guesses on guesses never go past a request's `max_new_tokens` or the context length
    (their rows would sit past the rotary table): requests that end there, with guesses that
    hold, end as plain decoding's do."""
    reqs = {
        f"r{n}": ([5 + n] * 20, SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True))
        for n in (1, 2, 3, 5, 16)  # 16: to the end of the context
    }
    plain, plain_finish, _ = _run(_engine(agreeing, speculative_mtp=0, max_context_len=36), reqs)
    engine = _engine(agreeing, speculative_mtp=4, max_context_len=36)
    got, finish, _ = _run(engine, reqs)
    assert got == plain and finish == plain_finish
    assert len(got["r16"]) == 36 - 20 and engine.stats().num_spec_accepted_tokens > 0


def test_mtp_settings_are_checked(tmp_path_factory, tiny_model_dir):
    from workers.model.loader import load_model

    with pytest.raises(ValueError, match="choose one source of guesses"):
        EngineConfig(speculative_ngram=4, speculative_mtp=1)
    # A transformers-made checkpoint: num_nextn_predict_layers 1 in config.json, no weights.
    ckpt = make_checkpoint("v3_qlora_groups", tmp_path_factory.mktemp("no-mtp"))
    with pytest.raises(ValueError, match="no multi-token-prediction module.*model.layers.4"):
        load_model(ckpt.path, progress=False, mtp=True)
    config = json.loads((ckpt.path / "config.json").read_text())
    (ckpt.path / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 0}))
    with pytest.raises(ValueError, match="no multi-token-prediction module.*is 0"):
        load_model(ckpt.path, progress=False, mtp=True)
    # Without --speculative-mtp the module is not loaded: the model is as before.
    assert load_model(tiny_model_dir, progress=False).mtp is None


def test_a_disaggregated_server_guesses_with_the_mtp_module(
    launch_tiny, tiny_server, tiny_model_dir, agreeing, ray_session
):
    """`--speculative-mtp` on disaggregated servers (the prefill rank computes the module's
    KV of the prompt and its first guesses; NIXL moves both with the rest): the tiny model
    gives the plain server's tokens; the agreeing model takes 5 decode steps for 15 tokens
    with 2 guesses a step, its first step on the decode rank guessing too; guesses are
    counted in /v1/stats."""
    import httpx

    from orchestrator.launcher import launch
    from tests.conftest import tiny_serve_config
    from tests.http_calls import _greedy

    prompts = _prompts()
    body = {"input_ids": prompts, "sampling_params": _greedy(16)}
    want = httpx.post(f"{tiny_server}/generate", json=body, timeout=120).json()
    engine = dataclasses.replace(tiny_serve_config(tiny_model_dir).engine, speculative_mtp=2)
    server = launch_tiny(engine=engine)
    try:
        got = httpx.post(f"{server.url}/generate", json=body, timeout=120).json()
        assert [g["output_ids"] for g in got] == [w["output_ids"] for w in want]
        assert all(0 < g["meta_info"]["spec_verify_ct"] <= 15 for g in got)
        stats = httpx.get(f"{server.url}/v1/stats", timeout=30).json()
        ranks = [r["stats"] for r in stats["ranks"] if r["stats"]]
        assert sum(s["num_spec_draft_tokens"] for s in ranks) > 0, ranks
    finally:
        server.stop()
    reqs = {f"r{i}": (p, SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True))
            for i, p in enumerate(prompts)}  # fmt: skip
    plain, _, _ = _run(_engine(agreeing, speculative_mtp=0), reqs)
    server = launch(tiny_serve_config(agreeing, engine=engine), model_dir=agreeing)
    try:
        got = httpx.post(f"{server.url}/generate", json=body, timeout=120).json()
        assert [g["output_ids"] for g in got] == list(plain.values())
        # The first token from the prefill rank, then 3 tokens a decode step: 5 steps.
        assert [g["meta_info"]["spec_verify_ct"] for g in got] == [5] * len(prompts)
    finally:
        server.stop()
