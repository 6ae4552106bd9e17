"""`StreamBuffer` (`--stream-interval`): which deltas a rank publishes at once and which wait."""

from __future__ import annotations

import pytest

from workers.engine.messages import HELD_CHECKPOINT, FinishReason, StreamBuffer, TokenDelta

pytestmark = pytest.mark.timeout(30)


def _d(
    rid: str,
    tokens: list[int],
    total: int,
    finish: FinishReason | None = None,
    hold: bool = False,
) -> TokenDelta:
    return TokenDelta(rid, tokens, finish, num_prompt_tokens=3, num_output_tokens=total, hold=hold)


def _published(buf: StreamBuffer, deltas: list[TokenDelta], stepped: bool = True) -> dict:
    return {d.rid: (d.token_ids, d.finish_reason) for d in buf.take(deltas, stepped)}


def test_interval_one_passes_everything_through():
    buf = StreamBuffer(1)
    deltas = [_d("a", [5], 2), _d("b", [6], 7)]
    assert buf.take(deltas, True) is deltas


def test_first_token_at_once_then_every_interval_tokens():
    buf = StreamBuffer(3)
    assert _published(buf, [_d("a", [10], 1)]) == {"a": ([10], None)}  # the first token
    assert _published(buf, [_d("a", [11], 2)]) == {}
    assert _published(buf, [_d("a", [12], 3)]) == {}
    assert _published(buf, [_d("a", [13], 4)]) == {"a": ([11, 12, 13], None)}
    assert _published(buf, [_d("a", [14], 5)]) == {}
    # The end comes at once, with what was held.
    assert _published(buf, [_d("a", [15], 6, FinishReason.LENGTH)]) == {
        "a": ([14, 15], FinishReason.LENGTH)
    }
    assert _published(buf, [], stepped=True) == {}  # nothing left behind


def test_a_first_delta_carrying_several_tokens_is_not_held():
    """Disaggregated: the decode rank's first delta has the prefill side's token too."""
    buf = StreamBuffer(4)
    assert _published(buf, [_d("a", [1, 2], 2)]) == {"a": ([1, 2], None)}


def test_a_request_that_got_no_token_in_a_step_is_released():
    buf = StreamBuffer(4)
    _published(buf, [_d("a", [1], 1), _d("b", [2], 1)])
    assert _published(buf, [_d("a", [3], 2), _d("b", [4], 2)]) == {}
    # "b" was preempted: the step gave it nothing, so what it holds goes out now.
    assert _published(buf, [_d("a", [5], 3)]) == {"b": ([4], None)}
    # An iteration without a model step (an abort, a transfer) does not count as a stall.
    assert _published(buf, [], stepped=False) == {}
    assert _published(buf, [_d("a", [6], 4)]) == {}
    assert _published(buf, [_d("a", [7], 5)]) == {"a": ([3, 5, 6, 7], None)}


def test_an_error_or_abort_takes_the_held_tokens_with_it():
    buf = StreamBuffer(8)
    _published(buf, [_d("a", [1], 1)])
    _published(buf, [_d("a", [2], 2)])
    abort = TokenDelta("a", [], FinishReason.ABORT)
    assert _published(buf, [abort], stepped=False) == {"a": ([2], FinishReason.ABORT)}


def test_a_request_not_streamed_is_held_after_its_first_token_until_it_ends():
    buf = StreamBuffer(1)  # held whatever the interval
    assert _published(buf, [_d("w", [1], 1, hold=True), _d("s", [9], 1)]) == {
        "w": ([1], None),  # the first token: time to first token
        "s": ([9], None),
    }
    for n in range(2, 40):
        assert _published(buf, [_d("w", [n], n, hold=True), _d("s", [9], n)]) == {"s": ([9], None)}
    # A step that gives it nothing (preempted) does not release it either.
    assert _published(buf, [_d("s", [9], 40)]) == {"s": ([9], None)}
    end = _d("w", [40], 40, FinishReason.LENGTH, hold=True)
    assert _published(buf, [end]) == {"w": (list(range(2, 41)), FinishReason.LENGTH)}
    assert _published(buf, [], stepped=True) == {}


def test_a_request_not_streamed_sends_what_it_holds_every_checkpoint():
    """What the router has of a request is what it resumes from after a rank failure: a long
    request sent whole goes out every `HELD_CHECKPOINT` tokens."""
    buf = StreamBuffer(4)
    assert _published(buf, [_d("w", [0], 1, hold=True)]) == {"w": ([0], None)}
    sent = []
    for n in range(1, 2 * HELD_CHECKPOINT + 10):
        out = _published(buf, [_d("w", [n], n + 1, hold=True)])
        if out:
            sent.append(out["w"][0])
    assert sent == [list(range(1, HELD_CHECKPOINT + 1)),
                    list(range(HELD_CHECKPOINT + 1, 2 * HELD_CHECKPOINT + 1))]  # fmt: skip


def test_a_held_request_that_is_aborted_takes_its_tokens_with_it():
    buf = StreamBuffer(1)
    _published(buf, [_d("w", [1], 1, hold=True)])
    _published(buf, [_d("w", [2], 2, hold=True)])
    _published(buf, [_d("w", [3], 3, hold=True)])
    abort = TokenDelta("w", [], FinishReason.ABORT)
    assert _published(buf, [abort], stepped=False) == {"w": ([2, 3], FinishReason.ABORT)}
    assert _published(buf, [], stepped=True) == {}


def test_interval_must_be_positive():
    with pytest.raises(ValueError, match="stream interval"):
        StreamBuffer(0)


def test_token_delta_pickles_every_field():
    import dataclasses
    import pickle

    from workers.engine.messages import TokenLogprob

    # Each field in turn set to a value other than its default, so a field left out of (or
    # misplaced in) TokenDelta.__reduce__ shows.
    changes = {
        "finish_reason": FinishReason.LENGTH, "error": "why", "num_prompt_tokens": 3,
        "num_output_tokens": 9, "hold": True,
        "logprobs": [TokenLogprob(-0.5), TokenLogprob(-1.5, ((6, -1.5),))],
        "num_cached_tokens": 2, "num_verify_steps": 4, "prompt_logprobs": [None, TokenLogprob(-2.0)],
        "resumable": True, "moved_to": "r#2", "kv_arrived": True,
    }  # fmt: skip
    assert {"rid", "token_ids", *changes} == {f.name for f in dataclasses.fields(TokenDelta)}
    base = TokenDelta("r", [5, 6])
    for name, value in changes.items():
        delta = dataclasses.replace(base, **{name: value})
        assert pickle.loads(pickle.dumps(delta, protocol=5)) == delta, name
    every = dataclasses.replace(base, **changes)
    assert pickle.loads(pickle.dumps(every, protocol=5)) == every
