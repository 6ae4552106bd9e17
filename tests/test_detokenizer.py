"""Incremental detokenization and stop strings, against toy decoders with known pitfalls and
against the built-in tiny model's real tokenizer."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from orchestrator.detokenizer import IncrementalDetokenizer

pytestmark = pytest.mark.timeout(60)


class ByteDecoder:
    """Token i is the single byte i; decoding is UTF-8 with replacement (as byte-level BPE)."""

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


class PieceDecoder:
    """SentencePiece-like: '▁' marks a space, and a decode drops the leading space."""

    def __init__(self, pieces: list[str], special: frozenset[int] = frozenset()):
        self.pieces = pieces
        self.special = special

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        kept = [i for i in ids if not (skip_special_tokens and i in self.special)]
        return "".join(self.pieces[i] for i in kept).replace("▁", " ").removeprefix(" ")


def stream(detok: IncrementalDetokenizer, ids: Sequence[int], step: int = 1) -> list[str]:
    out = [detok.add(ids[i : i + step]) for i in range(0, len(ids), step)]
    out.append(detok.flush())
    return out


@pytest.mark.parametrize("step", [1, 2, 3])
def test_multibyte_characters_split_over_tokens(step):
    text = "añ日本🙂b"
    ids = list(text.encode())
    deltas = stream(IncrementalDetokenizer(ByteDecoder()), ids, step)
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    # The emoji's four bytes produce nothing until the last one arrives.
    if step == 1:
        emoji_end = len("añ日本🙂".encode())
        assert deltas[emoji_end - 4 : emoji_end - 1] == ["", "", ""]
        assert deltas[emoji_end - 1] == "🙂"


def test_invalid_bytes_are_flushed_at_the_end():
    ids = list(b"ok") + [0xE6, 0x97]  # an unfinished 3-byte character
    deltas = stream(IncrementalDetokenizer(ByteDecoder()), ids)
    assert "".join(deltas[:-1]) == "ok"
    assert deltas[-1] == "\ufffd"


def test_leading_spaces_survive_windowed_decoding():
    pieces = ["<s>", "▁Hello", "▁world", "!", "▁how", "▁are", "▁you"]
    dec = PieceDecoder(pieces, special=frozenset({0}))
    prompt = [0, 1]
    out = [4, 5, 6, 2, 3]
    deltas = stream(IncrementalDetokenizer(dec, prompt), out)
    assert "".join(deltas) == " how are you world!"
    assert deltas[0] == " how"


def test_special_tokens_are_skipped():
    dec = PieceDecoder(["<s>", "</s>", "▁a", "▁b"], special=frozenset({0, 1}))
    assert "".join(stream(IncrementalDetokenizer(dec, [0]), [2, 3, 1])) == "a b"


def test_stop_string_cuts_text_and_later_tokens_are_ignored():
    detok = IncrementalDetokenizer(ByteDecoder(), stop=["END"])
    assert detok.add(list(b"abc")) == "abc"
    assert detok.add(list(b"dEN")) == "d"  # "EN" might start "END": held back
    assert detok.add(list(b"Dxyz")) == ""
    assert detok.matched_stop == "END" and detok.stopped
    assert detok.add(list(b"more")) == "" and detok.flush() == ""
    assert detok.text == "abcd"


def test_stop_strings_count_only_from_min_new_tokens_on():
    ids = list(b"abcabdab")  # "ab" ends at tokens 2, 5 and 8
    for min_new, want in [(0, ""), (2, ""), (3, "abc"), (5, "abc"), (6, "abcabd")]:
        detok = IncrementalDetokenizer(ByteDecoder(), stop=["ab"], min_new_tokens=min_new)
        assert "".join(stream(detok, ids)) == want and detok.matched_stop == "ab", min_new
    detok = IncrementalDetokenizer(ByteDecoder(), stop=["ab"], min_new_tokens=10)
    assert "".join(stream(detok, list(b"abcabdab"))) == "abcabdab" and not detok.stopped


def test_stop_string_spanning_deltas_and_the_earliest_match_wins():
    detok = IncrementalDetokenizer(ByteDecoder(), stop=["world", "lo w"])
    deltas = [detok.add(list(b"hel")), detok.add(list(b"lo")), detok.add(list(b" wor"))]
    assert detok.matched_stop == "lo w"
    assert "".join(deltas) + detok.flush() == "hel"


def test_held_back_text_is_released_when_it_stops_matching():
    detok = IncrementalDetokenizer(ByteDecoder(), stop=["\n\nUser:"])
    assert detok.add(list(b"one\n")) == "one"
    assert detok.add(list(b"\nUs")) == ""
    assert detok.add(list(b"a")) == "\n\nUsa"  # no longer a prefix of the stop string
    assert detok.add(list(b"\n")) == ""
    assert detok.flush() == "\n"  # generation ended: nothing is held any more
    assert detok.matched_stop is None


def test_stop_string_with_multibyte_characters():
    detok = IncrementalDetokenizer(ByteDecoder(), stop=["日本"])
    ids = list("a日本b".encode())
    text = "".join(detok.add([t]) for t in ids) + detok.flush()
    assert text == "a" and detok.matched_stop == "日本"


def test_stop_string_at_the_very_start():
    detok = IncrementalDetokenizer(ByteDecoder(), stop=["ab"])
    assert detok.add(list(b"ab")) == "" and detok.matched_stop == "ab"


@pytest.mark.parametrize("min_new", [0, 8])
def test_the_output_ends_at_the_token_that_completes_a_stop_string_however_deltas_group(min_new):
    """A rank sends tokens in deltas of any size (its stream interval, the router's merging):
    the text, the matched stop string and the tokens kept — up to the one that completed the
    match — do not depend on the grouping."""
    import random

    ids = list(b"xEND abENDcdEN-END tail")  # "END" ends at tokens 4, 10 and 18
    want_taken = 4 if min_new == 0 else 10
    rng = random.Random(min_new)
    for _ in range(40):
        detok = IncrementalDetokenizer(ByteDecoder(), stop=["END"], min_new_tokens=min_new)
        taken, text, at = 0, "", 0
        while at < len(ids) and not detok.stopped:
            size = rng.randint(1, 9)
            text += detok.add(ids[at : at + size])
            taken += detok.num_taken
            at += size
        assert detok.matched_stop == "END"
        assert taken == want_taken, taken
        assert text == bytes(ids[: want_taken - 3]).decode()


def test_to_output_drops_the_tokens_past_a_stop_string():
    from orchestrator.outputs import to_output
    from workers.engine.messages import FinishReason, TokenDelta, TokenLogprob

    detok = IncrementalDetokenizer(ByteDecoder(), stop=["EN"])
    first = TokenDelta("r", list(b"ab"), num_prompt_tokens=3, num_output_tokens=2)
    out = to_output(first, detok, "client", 3)
    assert (out.text, out.token_ids, out.num_output_tokens, out.finish_reason) == (
        "ab", list(b"ab"), 2, None,
    )  # fmt: skip
    ids = list(b"cENDxy")
    logprobs = [TokenLogprob(-0.1 * t) for t in ids]
    last = TokenDelta("r", ids, None, num_output_tokens=8, logprobs=logprobs)
    out = to_output(last, detok, "client", 3)
    assert out.finish_reason == "stop" and out.matched_stop == "EN"
    assert out.text == "c" and out.token_ids == list(b"cEN") and out.num_output_tokens == 5
    assert out.logprobs == logprobs[:3]
    # A delta the rank ended itself (EOS) keeps every token.
    detok = IncrementalDetokenizer(ByteDecoder(), stop=["EN"])
    eos = TokenDelta("r", list(b"xyz"), FinishReason.STOP, num_output_tokens=3)
    out = to_output(eos, detok, "client", 3)
    assert out.token_ids == list(b"xyz") and out.num_output_tokens == 3 and out.matched_stop == 122


@pytest.fixture(scope="module")
def tiny_tokenizer():
    tiny = pytest.importorskip("workers.model.tiny")
    from orchestrator.tokenizer import Tokenizer

    return Tokenizer.from_dir(tiny.ensure_tiny_checkpoint())


@pytest.mark.timeout(300)
def test_real_tokenizer_streams_exactly_the_full_decode(tiny_tokenizer):
    text = "Hello wörld! naïve café — 日本語のテキスト 🙂🚀 done.\nNew line\ttab"
    prompt = tiny_tokenizer.encode("Say:")
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    for step in (1, 2, 5):
        deltas = stream(IncrementalDetokenizer(tiny_tokenizer, prompt), ids, step)
        assert "".join(deltas) == tiny_tokenizer.decode(ids)
        assert not any("\ufffd" in d for d in deltas)


@pytest.mark.timeout(300)
def test_real_tokenizer_encode_and_chat_template(tiny_tokenizer):
    tok = tiny_tokenizer
    ids = tok.encode("Hello")
    if tok.add_bos_token:
        assert ids[0] == tok.bos_token_id
        assert tok.encode("Hello", add_special_tokens=False) == ids[1:]
    assert tok.eos_token_ids and all(0 <= i < tok.vocab_size for i in tok.eos_token_ids)
    assert tok.decode(ids) == "Hello"
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi there"}])
    assert "Hi there" in prompt


class WindowOnly:
    """A tokenizer seen through `decode` only: the detokenizer's window-decoding path."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed", range(4))
def test_stream_decoder_gives_what_window_decoding_gives(tiny_tokenizer, seed):
    """The native incremental decoder (`Tokenizer.decode_stream`) against the window decode
    on random ids — special tokens, bytes of split characters and all — random step sizes
    and stop strings: the same text, cut at the same place."""
    import random

    rng = random.Random(seed)
    vocab = tiny_tokenizer.vocab_size
    assert tiny_tokenizer.decode_stream(tiny_tokenizer.encode("Say:")) is not None
    streamed = 0
    for _ in range(30):
        if rng.random() < 0.5:  # may end inside a character: then the window decode serves
            prompt = [rng.randrange(vocab) for _ in range(rng.randint(0, 8))]
        else:
            prompt = tiny_tokenizer.encode(rng.choice(["Say:", "über 日本", "", "a b\n"]))
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 60))]
        stop = rng.choice([(), ("e",), ("th", " a"), ("\ufffd",)])
        skip = rng.random() < 0.8
        fast = IncrementalDetokenizer(tiny_tokenizer, prompt, stop, skip)
        slow = IncrementalDetokenizer(WindowOnly(tiny_tokenizer), prompt, stop, skip)
        assert slow._stream is None
        streamed += fast._stream is not None
        step = rng.randint(1, 3)
        got, want = stream(fast, ids, step), stream(slow, ids, step)
        assert "".join(got) == "".join(want), (prompt, ids, stop)
        assert fast.matched_stop == slow.matched_stop
    assert streamed >= 10
