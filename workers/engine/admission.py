"""A request entering an engine rank: checked against what the rank can serve (`check_request`,
on the actor thread that takes it), then made a `Sequence` with its own random generator and
structured-output matcher (`new_sequence`)."""

from __future__ import annotations

from collections.abc import Container

import torch

from workers.engine.grammar import GrammarBackend
from workers.engine.messages import GenerateRequest
from workers.engine.rank_reports import RankInfo
from workers.engine.sequence import Sequence


def check_request(
    req: GenerateRequest, info: RankInfo, running: Container[str], grammars: GrammarBackend
) -> None:
    """Raise ValueError (naming the field) for a request the rank described by `info` cannot
    serve; `running`: the rids it holds. A constraint is compiled here (cached), so the thread
    that checks pays for it and the loop finds it ready."""
    vocab = info.vocab_size
    if not req.input_ids:
        raise ValueError("input_ids: the prompt is empty")
    if req.rid in running:
        raise ValueError(f"rid: request {req.rid!r} is already running")
    bad = [t for t in req.input_ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"input_ids: token id {bad[0]} is outside the vocabulary [0, {vocab})")
    bad = [t for t in req.output_ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"output_ids: token id {bad[0]} is outside the vocabulary [0, {vocab})")
    req.sampling.validate(vocab)
    if req.migrated and not req.output_ids:
        raise ValueError("migrated: a request moves between decode ranks once it has output")
    if len(req.output_ids) >= req.sampling.max_new_tokens:
        raise ValueError(
            f"output_ids: {len(req.output_ids)} tokens generated already, max_new_tokens is "
            f"{req.sampling.max_new_tokens}: nothing is left to generate"
        )
    if req.sampling.constraint is not None:
        grammars.compile(req.sampling.constraint)
    total = len(req.input_ids) + req.sampling.max_new_tokens
    if total > info.max_context_len:
        raise ValueError(
            f"max_new_tokens: prompt ({len(req.input_ids)} tokens) + max_new_tokens "
            f"({req.sampling.max_new_tokens}) exceeds the context length {info.max_context_len}"
        )
    if total > info.kv_capacity_tokens:
        raise ValueError(
            f"max_new_tokens: prompt + max_new_tokens ({total}) exceeds the KV cache capacity "
            f"of {info.kv_capacity_tokens} tokens"
        )


def new_sequence(
    req: GenerateRequest, arrival: int, prefill_only: bool, grammars: GrammarBackend
) -> Sequence:
    """`req` as the rank holds it. A sampled request draws from its own generator, seeded with
    its `seed` (else at random), so a seeded request's tokens do not depend on its batch.
    A resumed request (`output_ids`) starts where it stood: its tokens follow the prompt, its
    generator has made their draws and its constraint has taken them (ValueError, naming
    `output_ids`, for a token the constraint does not allow)."""
    sp = req.sampling
    gen = None
    if not sp.is_greedy:
        gen = torch.Generator()
        gen.manual_seed(sp.seed if sp.seed is not None else torch.seed())
        skip_draws(gen, len(req.output_ids))
    seq = Sequence(
        req.rid, req.input_ids, sp, arrival, gen, prefill_only=prefill_only, stream=req.stream
    )
    seq.token_ids.extend(req.output_ids)
    seq.migrated = req.migrated
    if sp.constraint is not None:
        seq.matcher = grammars.matcher(sp.constraint, sp.stop_token_ids, sp.ignore_eos)
        for i, token in enumerate(req.output_ids):
            if not seq.matcher.accept(token):
                raise ValueError(f"output_ids: token {i} ({token}) breaks the output constraint")
    return seq


def skip_draws(gen: torch.Generator | None, count: int) -> None:
    """Advance `gen` past `count` tokens' draws (one uniform number each, as
    `workers.engine.sampling.sample` takes them): where a request that drew them elsewhere —
    on the prefill rank of its pair, on a rank it lost — would stand."""
    if gen is not None and count > 0:
        torch.rand(count, dtype=torch.float64, generator=gen)
