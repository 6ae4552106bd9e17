"""Logits adjustments (penalties, a minimum length), min-p and logprobs against plain
references written token by token; the logprob payload's trips through deltas and the
transfer notification."""

from __future__ import annotations

import math
import random

import pytest
import torch

from workers.engine.messages import (
    OutputConstraint,
    SamplingParams,
    StreamBuffer,
    TokenDelta,
    TokenLogprob,
)
from workers.engine.sampling import (
    History,
    adjust_logits,
    filtered_probs,
    sample,
    token_logprobs,
)
from workers.transfer.messages import Notification

pytestmark = pytest.mark.timeout(60)

VOCAB = 50
EOS = (1,)


def _reference(logits: list[float], p: SamplingParams, ids: list[int], num_prompt: int):
    """One row's adjusted logits, token by token, straight from each definition."""
    out = list(logits)
    output = ids[num_prompt:]
    for t, bias in p.logit_bias:  # OpenAI's: added to the logit, before everything else
        out[t] += bias
    if len(output) < p.min_new_tokens:
        for t in set(p.stop_token_ids) | (set() if p.ignore_eos else set(EOS)):
            out[t] = -math.inf
    for t in set(ids):  # Hugging Face's RepetitionPenaltyLogitsProcessor
        v = out[t]
        out[t] = v / p.repetition_penalty if v > 0 else v * p.repetition_penalty
    for t in set(output):  # OpenAI's definition
        out[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    return out


def _random_params(rng: random.Random) -> SamplingParams:
    pick = rng.random
    return SamplingParams(
        max_new_tokens=20,
        min_new_tokens=rng.choice([0, 0, 3, 10]),
        stop_token_ids=tuple(rng.sample(range(VOCAB), rng.randint(0, 2))),
        ignore_eos=rng.random() < 0.3,
        frequency_penalty=rng.choice([0.0, round(4 * pick() - 2, 2)]),
        presence_penalty=rng.choice([0.0, round(4 * pick() - 2, 2)]),
        repetition_penalty=rng.choice([1.0, round(0.2 + 1.8 * pick(), 2)]),
        logit_bias=tuple(
            (t, round(200 * pick() - 100, 1)) for t in sorted(rng.sample(range(VOCAB), 3))
        )
        if pick() < 0.4
        else (),
    )


def test_adjust_logits_matches_the_definitions_row_by_row():
    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        rows = rng.randint(1, 6)
        logits = torch.randn(rows, VOCAB, generator=g) * 3
        before = logits.clone()
        params = [_random_params(rng) for _ in range(rows)]
        histories = []
        for _ in range(rows):
            num_prompt = rng.randint(1, 8)
            # Few distinct ids, so that tokens repeat within and across prompt and output.
            ids = [rng.randrange(12) for _ in range(num_prompt + rng.randint(0, 12))]
            histories.append(History(ids, num_prompt))
        got = adjust_logits(logits, params, histories, EOS)
        assert torch.equal(logits, before), "the input logits must not change"
        for i in range(rows):
            want = torch.tensor(_reference(before[i].tolist(), params[i], *histories[i]))
            torch.testing.assert_close(got[i], want, rtol=1e-6, atol=1e-5)


def test_rows_without_adjustments_are_left_alone_at_no_cost():
    logits = torch.randn(3, VOCAB)
    plain = [SamplingParams(), SamplingParams(temperature=0.0), SamplingParams(min_p=0.5)]
    histories = [History([2, 3, 3], 1)] * 3
    assert adjust_logits(logits, plain, histories, EOS) is logits
    reached = SamplingParams(max_new_tokens=8, min_new_tokens=2)  # 2 output tokens already
    row = logits[:1]
    assert adjust_logits(row, [reached], [History([2, 3, 3], 1)], EOS) is row


def test_min_new_tokens_bans_eos_and_stop_tokens_until_reached():
    p = SamplingParams(max_new_tokens=8, min_new_tokens=2, stop_token_ids=(7,))
    logits = torch.zeros(1, VOCAB)
    for num_out, banned in [(0, True), (1, True), (2, False)]:
        ids = [3, 4] + [5] * num_out
        row = adjust_logits(logits, [p], [History(ids, 2)], EOS)[0]
        assert bool(row[1] == -math.inf) is banned and bool(row[7] == -math.inf) is banned
        assert torch.isfinite(row[[0, 2, 3, 5]]).all()
    keep_eos = SamplingParams(max_new_tokens=8, min_new_tokens=2, ignore_eos=True)
    row = adjust_logits(logits, [keep_eos], [History([3], 1)], EOS)[0]
    assert torch.isfinite(row).all()  # EOS does not stop this request anyway


def test_min_p_keeps_tokens_within_the_fraction_of_the_best():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04]))
    probs = filtered_probs(logits[None], [SamplingParams(min_p=0.25)])[0]  # keeps p >= 0.125
    want = torch.tensor([0.5, 0.3, 0.0, 0.0, 0.0])
    torch.testing.assert_close(probs, want / want.sum())
    assert torch.equal(
        filtered_probs(logits[None], [SamplingParams(min_p=0.0)])[0] > 0, logits > -1e9
    )


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("min_p", 1.5, "min_p"),
        ("min_new_tokens", 9, "min_new_tokens"),
        ("frequency_penalty", 2.5, "frequency_penalty"),
        ("presence_penalty", -3.0, "presence_penalty"),
        ("repetition_penalty", 0.0, "repetition_penalty"),
        ("top_logprobs", 21, "top_logprobs"),
        ("logit_bias", ((3, 101.0),), "logit_bias"),
        ("logit_bias", ((VOCAB, 1.0),), "logit_bias"),
    ],
)
def test_sampling_params_validation_names_the_field(field, value, message):
    extra = {"logprobs": True} if field == "top_logprobs" else {}
    p = SamplingParams(max_new_tokens=8, **{field: value}, **extra)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        p.validate(VOCAB)
    with pytest.raises(ValueError, match="need logprobs"):
        SamplingParams(top_logprobs=2).validate(VOCAB)


def test_token_logprobs_match_log_softmax_of_the_raw_logits():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, VOCAB, generator=g) * 4
    tokens = [3, 9, 0, 41]
    params = [
        SamplingParams(logprobs=True, top_logprobs=5),
        SamplingParams(),
        SamplingParams(logprobs=True),
        SamplingParams(logprobs=True, top_logprobs=2),
    ]
    got = token_logprobs(logits, tokens, params)
    assert got[1] is None
    ref = torch.log_softmax(logits.double(), dim=-1)
    for i in (0, 2, 3):
        lp = got[i]
        assert lp is not None
        assert lp.logprob == pytest.approx(float(ref[i, tokens[i]]), abs=1e-5)
        order = torch.argsort(ref[i], descending=True)[: params[i].top_logprobs].tolist()
        assert [t for t, _ in lp.top] == order
        for t, v in lp.top:
            assert v == pytest.approx(float(ref[i, t]), abs=1e-5)
    assert token_logprobs(logits, tokens, [SamplingParams()] * 4) == [None] * 4


def test_held_deltas_keep_one_logprob_per_token():
    buf = StreamBuffer(interval=1)
    lp = [TokenLogprob(-0.1 * i, ((i, -0.1 * i),)) for i in range(5)]

    def delta(i: int, finish: bool = False) -> TokenDelta:
        from workers.engine.messages import FinishReason

        return TokenDelta(
            "r", [i], FinishReason.LENGTH if finish else None, num_output_tokens=i + 1,
            hold=True, logprobs=[lp[i]],
        )  # fmt: skip

    assert [d.token_ids for d in buf.take([delta(0)], stepped=True)] == [[0]]
    for i in (1, 2, 3):
        assert buf.take([delta(i)], stepped=True) == []
    (last,) = buf.take([delta(4, finish=True)], stepped=True)
    assert last.token_ids == [1, 2, 3, 4] and last.logprobs == lp[1:]
    # An abort after held tokens (no token of its own) still carries theirs.
    buf.take([delta(0)], stepped=True)
    buf.take([delta(1)], stepped=True)
    from workers.engine.messages import FinishReason

    (end,) = buf.take(
        [TokenDelta("r", [], FinishReason.ABORT, num_output_tokens=2, hold=True)], stepped=True
    )
    assert end.token_ids == [1] and end.logprobs == [lp[1]]


def test_notification_carries_the_first_tokens_logprob_and_the_guesses_after_it():
    first = (-0.25, ((5, -0.25), (9, -1.5)))
    note = Notification("done", "r1", 5, first_logprob=first, guesses=(7, 8, 9))
    back = Notification.decode(note.encode())
    assert back == note
    assert TokenLogprob(*first) == TokenLogprob(-0.25, ((5, -0.25), (9, -1.5)))
    assert Notification.decode(Notification("done", "r2", 3).encode()) == Notification(
        "done", "r2", 3
    )


def test_priority_logit_bias_and_constraints_reach_the_ranks_settings():
    """Every route's parser carries these into the `SamplingParams` a rank gets."""
    from orchestrator.grpc_messages import generate_body
    from orchestrator.openai_request import parse_chat, parse_completion
    from orchestrator.protocol import parse_generate
    from orchestrator.routed import Limits
    from orchestrator.sampling_request import resolve_sampling
    from proto import pdserve_pb2 as pb

    limits = Limits(vocab_size=VOCAB, max_context_len=64, kv_capacity_tokens=64)
    sp = pb.SamplingParams(max_new_tokens=4, regex="a+")
    sp.logit_bias[3] = -2.5
    grpc_body = generate_body(
        pb.GenerateRequest(input_ids=pb.TokenIds(ids=[1]), sampling=sp, priority=-4)
    )
    user = [{"role": "user", "content": "x"}]
    extra = {"priority": -4, "logit_bias": {"3": -2.5}}
    requests = [
        parse_generate({"input_ids": [1], "priority": -4, "sampling_params": {
            "max_new_tokens": 4, "regex": "a+", "logit_bias": {"3": -2.5}}}).calls[0].sampling,
        parse_generate(grpc_body).calls[0].sampling,
        parse_completion({"prompt": [1], "max_tokens": 4, "guided_regex": "a+", **extra}).sampling,
        parse_chat({"messages": user, "max_tokens": 4, "regex": "a+", **extra}).sampling,
    ]  # fmt: skip
    for req in requests:
        params = resolve_sampling([1], req, limits, 16, "prompt")
        assert params.priority == -4 and params.logit_bias == ((3, -2.5),)
        assert params.constraint == OutputConstraint("regex", "a+")


@pytest.mark.parametrize(
    ("constraint", "message"),
    [
        ({"regex": ""}, "sampling_params.regex: must not be empty"),
        ({"ebnf": ""}, "sampling_params.ebnf: must not be empty"),
        ({"regex": 5}, "sampling_params.regex: expected a non-empty string, got int"),
    ],
)
def test_an_empty_or_mistyped_constraint_is_refused_naming_it(constraint, message):
    from orchestrator.protocol import parse_generate
    from orchestrator.request_fields import RequestError

    body = {"input_ids": [1], "sampling_params": {"max_new_tokens": 4, **constraint}}
    with pytest.raises(RequestError, match=message):
        parse_generate(body)


def _filtered_row(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The filters one row at a time, written out plainly: the reference for the batch."""
    logits = logits.double() / p.temperature
    if 0 < p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        probs = probs / probs.sum()
    if p.top_p < 1.0:  # the most likely tokens until their mass reaches top_p, and ties
        mass, last = 0.0, 1.0
        for value in sorted(probs.tolist(), reverse=True):
            if mass >= p.top_p:
                break
            mass, last = mass + value, value
        probs = probs.masked_fill(probs < last, 0.0)
        probs = probs / probs.sum()
    return probs


def test_batched_filters_match_the_row_by_row_reference():
    rng = random.Random(3)
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        rows = rng.randint(1, 9)
        logits = torch.randn(rows, VOCAB, generator=g) * rng.choice([0.5, 3.0])
        params = [
            SamplingParams(
                temperature=rng.choice([0.3, 1.0, 1.7]),
                top_k=rng.choice([0, 0, 1, 5, VOCAB - 1, VOCAB + 3]),
                top_p=rng.choice([1.0, 1.0, 0.9, 0.3]),
                min_p=rng.choice([0.0, 0.0, 0.05, 0.5]),
            )
            for _ in range(rows)
        ]
        got = filtered_probs(logits, params)
        for i, p in enumerate(params):
            want = _filtered_row(logits[i], p).float()
            torch.testing.assert_close(got[i], want, atol=1e-6, rtol=1e-4)


def test_batched_draws_follow_each_rows_distribution_and_seed():
    """Rows of different filters drawn together: each row's frequencies match its own
    filtered distribution; a seeded row repeats whatever else is in the batch."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 6, generator=g) * 2
    params = [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, top_k=3),
        SamplingParams(temperature=1.3, top_p=0.6),
        SamplingParams(temperature=0.0),  # greedy, in the same batch
    ]
    n = 6000
    counts = torch.zeros(4, 6)
    for _ in range(n):
        for row, token in enumerate(sample(logits, params, [None] * 4)):
            counts[row, token] += 1
    want = filtered_probs(logits[:3], params[:3])
    torch.testing.assert_close(counts[:3] / n, want, atol=0.025, rtol=0)
    assert (counts[:3][want == 0] == 0).all()  # a filtered-out token is never drawn
    assert counts[3, int(logits[3].argmax())] == n

    def seeded(others: int) -> list[int]:
        gen = torch.Generator().manual_seed(11)
        batch = [SamplingParams(temperature=1.0)] * others + [params[2]]
        gens = [None] * others + [gen]
        return [sample(logits[[0] * others + [2]], batch, gens)[-1] for _ in range(40)]

    assert seeded(0) == seeded(3) == seeded(7)
