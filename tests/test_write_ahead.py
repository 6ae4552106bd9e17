"""A prefill rank writes each layer's KV of the prompts a step finishes to the decode rank as
soon as that layer is computed (`KVHandoff.layer_writer`, `KVTransferEngine.write_ahead`).
Real engines, hand-offs and in-process transfer engines; the router's part is played by
`tests.test_kv_pressure._Router`."""

from __future__ import annotations

import itertools
import random
import time
from types import SimpleNamespace

import pytest
import torch

from tests.checkpoints import make_checkpoint
from tests.test_kv_pressure import PAGE, _expected, _Router
from tests.test_kv_pressure import _Rank as PressureRank
from workers.engine.config import EngineConfig
from workers.engine.engine import Engine
from workers.engine.handoff import KVHandoff
from workers.engine.messages import GenerateRequest, SamplingParams
from workers.transfer.local import LocalTransferEngine

pytestmark = pytest.mark.timeout(120)

_names = itertools.count()


def _rows(kv: torch.Tensor, pages) -> torch.Tensor:
    """The KV of `pages`, every layer: `[layers, len(pages) * PAGE, dim]`."""
    return torch.cat([kv[:, p * PAGE : (p + 1) * PAGE] for p in pages], dim=1)


class _Checked(LocalTransferEngine):
    """Sending side: notes, at each `write_ahead`, the layer's KV of the request's pages as
    it is then, to check that it was final (the same as when the request was sent), and at
    each send the KV it is to deliver. Receiving side: the KV that arrived."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: dict[tuple[str, int], torch.Tensor] = {}
        self.sent: dict[str, torch.Tensor] = {}  # rid -> its pages' KV past the skipped ones
        self.received: dict[str, torch.Tensor] = {}
        self._dst: dict[str, list[int]] = {}

    def write_ahead(self, transfer_id, src_pages, layer, target, ready=None) -> None:
        self.seen[(transfer_id, layer)] = _rows(self.kv, src_pages)[layer].clone()
        super().write_ahead(transfer_id, src_pages, layer, target, ready)

    def send(self, transfer_id, src_pages, *args, **kwargs):
        now = _rows(self.kv, src_pages)
        for (rid, layer), rows in self.seen.items():
            if rid == transfer_id:
                assert torch.equal(rows, now[layer]), f"{rid}: layer {layer} changed after"
        target = kwargs.get("target")
        skip = target.skip_pages if target is not None else 0
        self.sent[transfer_id] = _rows(self.kv, src_pages[skip:]).clone()
        return super().send(transfer_id, src_pages, *args, **kwargs)

    def expect(self, transfer_id, dst_pages, *args, **kwargs):
        self._dst[transfer_id] = list(dst_pages)
        return super().expect(transfer_id, dst_pages, *args, **kwargs)

    def poll(self):
        out = super().poll()
        for r in out:
            if r.role == "recv" and r.ok:
                self.received[r.transfer_id] = _rows(self.kv, self._dst[r.transfer_id]).clone()
        return out


class _Rank(PressureRank):
    """`test_kv_pressure`'s rank, with write-ahead on or off and a checking transfer engine."""

    def __init__(self, path, role: str, write_ahead: bool, budget: int, **config_kw):
        config = EngineConfig(
            page_size=PAGE, kv_capacity_tokens=2048, chunked_prefill_size=budget,
            kv_write_ahead=write_ahead, **config_kw,
        )  # fmt: skip
        self.role = role
        self.engine = Engine(path, config, progress=False)
        self.transfer = _Checked(f"ahead-{next(_names)}", self.engine.kv.data, PAGE)
        self.handoff = KVHandoff(role, self.transfer, 30.0, quarantine_s=0.05)
        self.handoff.bind(self.engine)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint("v3_qlora_groups", tmp_path_factory.mktemp("ahead"))


def _run(
    path, write_ahead: bool, rounds: list[dict[str, list[int]]], sampling: SamplingParams, **kw
):
    """Each round's prompts at once, the rounds one after the other; the router, the
    prefill rank's transfer totals, both transfer engines and the decode rank's reused
    prompt tokens."""
    prefill = _Rank(path, "prefill", write_ahead, budget=48, **kw)
    decode = _Rank(path, "decode", write_ahead, budget=2048, **kw)
    router = _Router()
    try:
        for prompts in rounds:
            for rid, prompt in prompts.items():  # the decode rank first: targets come early
                decode.add(rid, prompt, sampling)
                prefill.add(rid, prompt, sampling)
                router.prefill_of[rid] = prefill
            router.run([decode, prefill], set(prompts))
        deadline = time.monotonic() + 5
        left = prefill.transfer
        while left._ahead or left._dropped or prefill.handoff.busy or decode.handoff.busy:
            assert time.monotonic() < deadline, "writes ahead or transfers left behind"
            for rank in (prefill, decode):
                rank.step()
            time.sleep(0.01)
        for rank in (prefill, decode):
            assert not rank.engine.requests
            assert rank.engine.kv.allocator.num_free == rank.engine.kv.num_pages
        reused = decode.engine.scheduler.num_reused_tokens
        return router, prefill.handoff.totals, (prefill.transfer, decode.transfer), reused
    finally:
        prefill.close()
        decode.close()


def test_layers_written_ahead_give_the_same_tokens_as_sending_after_the_prefill(ckpt):
    """Long prompts chunked, short ones batched; a second round starts with the first's
    prompts (cached on both sides: the decode rank holds their first pages, which are not
    sent)."""
    rng = random.Random(3)
    first = {f"r{i}": [rng.randrange(3, 256) for _ in range(n)]
             for i, n in enumerate((5, 17, 40, 48, 61, 100, 130, 9))}  # fmt: skip
    second = {f"s{rid}": first[rid][:n] + [rng.randrange(3, 256) for _ in range(23)]
              for rid, n in (("r3", 48), ("r5", 90), ("r6", 130))}  # fmt: skip
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    expected = _expected(ckpt.path, first | second, greedy)
    num = len(first) + len(second)
    router, totals, (transfer, received), reused = _run(ckpt.path, True, [first, second], greedy)
    assert not router.errors and router.tokens == expected
    assert totals.sent == num and reused > 0
    for rid, kv in transfer.sent.items():
        assert torch.equal(received.received[rid], kv), rid
    # Every prompt's target was here before its last chunk (the decode rank steps first).
    assert totals.sent_ahead == num, totals
    layers = {layer for _, layer in transfer.seen}
    assert layers == set(range(transfer.layout.num_layers))
    router, totals, (transfer, _), reused = _run(ckpt.path, False, [first, second], greedy)
    assert not router.errors and router.tokens == expected
    assert totals.sent == num and totals.sent_ahead == 0 and not transfer.seen


def test_the_mtp_module_s_kv_computed_after_the_step_is_sent_with_it(tiny_model_dir):
    """With `--speculative-mtp` the cache has one more layer, which the module writes after
    the step's forward: the send writes it (and the decode rank has every layer)."""
    rng = random.Random(4)
    prompts = {f"m{i}": [rng.randrange(3, 900) for _ in range(n)] for i, n in enumerate((7, 70))}
    greedy = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
    router, totals, (sender, receiver), _ = _run(
        tiny_model_dir, True, [prompts], greedy, speculative_mtp=1
    )
    assert not router.errors and totals.sent_ahead == len(prompts)
    mtp_layer = sender.layout.num_layers - 1
    assert {layer for _, layer in sender.seen} == set(range(mtp_layer))  # not the module's
    for rid, kv in sender.sent.items():
        assert kv[mtp_layer].abs().sum() > 0
        assert torch.equal(receiver.received[rid], kv), rid


def test_writes_ahead_of_a_request_not_handed_off_are_dropped(ckpt):
    """The step's requests are handed off right after it; one that is not (it ended
    otherwise) has its writes ahead stopped and forgotten."""
    engine = Engine(ckpt.path, EngineConfig(page_size=PAGE, kv_capacity_tokens=256), progress=False)
    dst = LocalTransferEngine(f"ahead-{next(_names)}", torch.zeros_like(engine.kv.data), PAGE)
    src = LocalTransferEngine(f"ahead-{next(_names)}", engine.kv.data, PAGE, write_latency_s=30)
    handoff = KVHandoff("prefill", src, 30.0)
    handoff.bind(engine)
    try:
        assert engine.layer_writes == handoff.layer_writer
        target = dst.expect("x", [0, 1], timeout_s=30).target
        handoff.set_target("x", target)
        seq = SimpleNamespace(rid="x", pages=[2, 3], prefill_only=True, num_pending=8)
        after_layer = handoff.layer_writer(SimpleNamespace(prefills=[(seq, 8)]))
        assert after_layer is not None
        assert handoff.layer_writer(SimpleNamespace(prefills=[(seq, 4)])) is None  # not last
        after_layer(0)
        assert src._ahead["x"].ready or src._ahead["x"].handles
        handoff.after_step(engine)
        deadline = time.monotonic() + 5
        while src._ahead or src._dropped:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert src.poll() == []
    finally:
        handoff.close()
        dst.close()


@pytest.mark.parametrize("overlap", [False, True], ids=["one-batch", "two-batch-overlap"])
def test_the_model_calls_after_layer_once_each_layer_has_written_its_kv(ckpt, overlap):
    engine = Engine(ckpt.path, EngineConfig(page_size=PAGE, kv_capacity_tokens=256), progress=False)
    engine.two_batch_overlap = overlap  # (its forward runs without expert parallelism too)
    kv = engine.kv.data
    calls: list[tuple[int, torch.Tensor]] = []
    engine.layer_writes = lambda batch: lambda layer: calls.append((layer, kv.clone()))
    rng = random.Random(5)
    greedy = SamplingParams(max_new_tokens=2, temperature=0.0, ignore_eos=True)
    for rid, n in (("a", 21), ("b", 9)):
        prompt = [rng.randrange(3, 256) for _ in range(n)]
        engine.add(GenerateRequest(rid, prompt, greedy))
    engine.step()
    num_layers = len(engine.model.model.layers)
    assert [layer for layer, _ in calls] == list(range(num_layers))
    for layer, seen in calls:
        assert torch.equal(seen[layer], kv[layer]), f"layer {layer} was not final at its call"
        if layer + 1 < num_layers:
            assert not torch.equal(seen[layer + 1], kv[layer + 1]), f"layer {layer + 1} early"
