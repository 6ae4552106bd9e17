"""Turning logits into next tokens: penalties and a minimum length (`adjust_logits`), then
greedy, temperature, top-k, top-p, min-p, per-request seeds (`sample`); the model's
log-probabilities of what was drawn (`token_logprobs`)."""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np
import torch

from workers.engine.messages import SamplingParams, TokenLogprob


class History(NamedTuple):
    """What a row's penalties look at: its tokens so far, prompt first."""

    token_ids: list[int]
    num_prompt_tokens: int


def _adjusts_now(p: SamplingParams, history: History) -> bool:
    num_out = len(history.token_ids) - history.num_prompt_tokens
    return p.penalizes or bool(p.logit_bias) or num_out < p.min_new_tokens


def adjust_logits(
    logits: torch.Tensor,  # [S, vocab] float32
    params: Sequence[SamplingParams],
    histories: Sequence[History],
    eos_token_ids: Sequence[int],
) -> torch.Tensor:
    """`logits`, or a copy with each asking row's adjustments, in this order: the logit bias;
    EOS and stop tokens banned while the output is shorter than `min_new_tokens`; the
    repetition penalty over prompt and output tokens; the frequency and presence penalties
    over output tokens. Rows that ask for none of these cost nothing. Each adjustment is one
    indexed operation over all the rows that ask for it (one per row cost ~50 us a row on a
    CPU, and a GPU a few small kernels per row)."""
    rows = [i for i, p in enumerate(params) if _adjusts_now(p, histories[i])]
    if not rows:
        return logits
    logits = logits.clone()
    bias = _Entries()  # (row, token) pairs and what each gets
    banned = _Entries()
    repeated = _Entries()  # every prompt and output token of a row, and the row's penalty
    counted = _Entries()  # every output token, by penalized row (its index in `penalized`)
    penalized: list[int] = []
    freq: list[float] = []
    presence: list[float] = []
    for i in rows:
        p, (ids, num_prompt) = params[i], histories[i]
        num_out = len(ids) - num_prompt
        for token, value in p.logit_bias:
            bias.add(i, [token], value)
        if num_out < p.min_new_tokens:
            banned.add(i, {*p.stop_token_ids, *(() if p.ignore_eos else eos_token_ids)}, 0.0)
        if p.repetition_penalty != 1.0:
            repeated.add(i, ids, p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and num_out:
            counted.add(len(penalized), ids[num_prompt:], 0.0)
            penalized.append(i)
            freq.append(p.frequency_penalty)
            presence.append(p.presence_penalty)
    device, vocab = logits.device, logits.shape[-1]
    if bias:
        logits.index_put_(bias.index(device), bias.values(logits), accumulate=True)
    if banned:
        logits.index_put_(banned.index(device), torch.tensor(float("-inf"), device=device))
    if repeated:
        # A token seen twice reads and writes the same value: duplicates do no harm.
        where, penalty = repeated.index(device), repeated.values(logits)
        vals = logits[where]
        logits[where] = torch.where(vals > 0, vals / penalty, vals * penalty)
    if counted:
        local, tokens = counted.index(device)
        flat = torch.bincount(local * vocab + tokens, minlength=len(freq) * vocab)
        counts = flat.view(len(freq), vocab).to(logits.dtype)
        f = torch.tensor(freq, dtype=logits.dtype, device=device)[:, None]
        pr = torch.tensor(presence, dtype=logits.dtype, device=device)[:, None]
        index = torch.tensor(penalized, dtype=torch.int64, device=device)
        logits.index_add_(0, index, -(f * counts + pr * (counts > 0).to(logits.dtype)))
    return logits


class _Entries:
    """(row, token) pairs gathered row by row in flat arrays, with a value per row."""

    def __init__(self) -> None:
        self.rows = array("q")
        self.tokens = array("q")
        self.per_row: list[tuple[int, float]] = []  # (number of tokens, value)

    def __bool__(self) -> bool:
        return bool(self.tokens)

    def add(self, row: int, tokens: Iterable[int], value: float) -> None:
        before = len(self.tokens)
        self.tokens.extend(tokens)
        n = len(self.tokens) - before
        self.rows.extend(array("q", [row]) * n)
        self.per_row.append((n, value))

    def index(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.frombuffer(self.rows, dtype=torch.int64).to(device)
        return rows, torch.frombuffer(self.tokens, dtype=torch.int64).to(device)

    def values(self, like: torch.Tensor) -> torch.Tensor:
        """Each pair's value, as `like`'s dtype and device."""
        counts = torch.tensor([n for n, _ in self.per_row], dtype=torch.int64)
        values = torch.tensor([v for _, v in self.per_row], dtype=like.dtype)
        return values.repeat_interleave(counts).to(like.device)


def sample(
    logits: torch.Tensor,  # [S, vocab] float32
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> list[int]:
    """One token per row. Greedy rows take the argmax; the others draw together from their
    filtered distributions (`filtered_probs`) by inverse transform: one uniform number per
    row — from the request's own generator when it has one, so a seeded request repeats
    whatever its batch — against the row's cumulative probabilities. One pass over the
    sampled rows, whatever their number (a row at a time cost ~80 us each on a CPU, and a
    GPU a sync per row); on a GPU the greedy and the drawn tokens come back in one copy."""
    rows = [i for i, p in enumerate(params) if not p.is_greedy]
    if not rows:
        return greedy_tokens(logits)
    index = torch.tensor(rows, dtype=torch.int64, device=logits.device)
    probs = filtered_probs(logits.index_select(0, index), [params[i] for i in rows])
    cdf = probs.cumsum_(-1)
    # u in (0, 1]: the first token whose cumulative probability reaches u times the total is
    # one of positive probability (the sum rises there), and u = 1 still finds the last one.
    u = (1.0 - _uniforms([generators[i] for i in rows])).to(torch.float32)
    u = u.to(logits.device, non_blocking=True)
    drawn = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None])[:, 0]
    drawn.clamp_(max=cdf.shape[-1] - 1)
    if logits.device.type != "cpu":
        tokens: list[int] = logits.argmax(dim=-1).index_copy_(0, index, drawn).tolist()
        return tokens
    out = greedy_tokens(logits) if len(rows) < len(params) else [0] * len(params)
    for row, token in zip(rows, drawn.tolist(), strict=True):
        out[row] = token
    return out


def _uniforms(generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """A number in [0, 1) per row (float64 CPU): from the row's generator, else from torch's
    default one."""
    u = torch.rand(len(generators), dtype=torch.float64)
    for i, gen in enumerate(generators):
        if gen is not None:
            u[i] = torch.rand((), dtype=torch.float64, generator=gen)
    return u


def greedy_tokens(logits: torch.Tensor) -> list[int]:
    """Each row's argmax (the first on ties; a NaN wins, as in `torch.argmax`). On the CPU
    through numpy: torch's CPU argmax runs ~10-20x slower here (137 us at 64 x 1024, 17.6 ms
    at 64 x 129280 against numpy's 8 us and 1.4 ms)."""
    if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float64):
        out: list[int] = logits.numpy().argmax(axis=-1).tolist()
        return out
    return logits.argmax(dim=-1).tolist()


def filtered_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Per row of `logits` `[R, vocab]`, its request's probabilities after temperature, then
    top-k, min-p and top-p, renormalized: `[R, vocab]` float32. Each filter keeps the tokens
    at or above a probability floor — the k-th largest; `min_p` times the largest; the
    smallest of the most likely tokens whose mass (after the first two filters) reaches
    `top_p` — so a tie with the last token kept is kept too. The floors come from one sort
    of the probabilities, only for the rows that ask for top-k or top-p (on a CPU by numpy,
    ~25x faster than torch's sort there)."""
    device = logits.device
    temps = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
    probs = torch.softmax(logits.float() / temps[:, None], dim=-1)
    vocab = probs.shape[-1]
    floor = torch.zeros(len(params), 1, device=device)
    if any(p.min_p > 0.0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device)
        floor = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
    ranked = [i for i, p in enumerate(params) if 0 < p.top_k < vocab or p.top_p < 1.0]
    if ranked:
        index = torch.tensor(ranked, dtype=torch.int64, device=device)
        desc = _sorted_descending(probs.index_select(0, index))
        k = [params[i].top_k if 0 < params[i].top_k < vocab else vocab for i in ranked]
        kth = desc.gather(1, torch.tensor(k, device=device)[:, None] - 1)
        row_floor = torch.maximum(floor.index_select(0, index), kth)
        # Top-p over what the floor keeps (a prefix of `desc`): the tokens whose mass before
        # them, as a share of the kept mass, is still below top_p; at least the first.
        kept = desc * (desc >= row_floor)  # (`masked_fill` is ~2x slower on a CPU)
        cum = kept.cumsum(-1)
        top_p = torch.tensor([params[i].top_p for i in ranked], device=device)[:, None]
        num = ((cum - kept) < top_p * cum[:, -1:]).sum(-1, keepdim=True).clamp_(min=1)
        row_floor = torch.maximum(row_floor, desc.gather(1, num - 1))
        floor = floor.index_copy(0, index, row_floor)
    probs = probs * (probs >= floor)
    return probs / probs.sum(dim=-1, keepdim=True)


def _sorted_descending(x: torch.Tensor) -> torch.Tensor:
    if x.device.type == "cpu":
        ascending = np.sort(x.numpy(), axis=-1)
        return torch.from_numpy(np.ascontiguousarray(ascending[:, ::-1]))
    return torch.sort(x, dim=-1, descending=True).values


def token_logprobs(
    logits: torch.Tensor,  # [S, vocab] float32, the model's (before `adjust_logits`)
    tokens: Sequence[int],
    params: Sequence[SamplingParams],
) -> list[TokenLogprob | None]:
    """Per row, the drawn token's log-probability and the top `top_logprobs` for rows that
    ask for logprobs (None for the others). One log-softmax over the asking rows only."""
    out: list[TokenLogprob | None] = [None] * len(params)
    rows = [i for i, p in enumerate(params) if p.logprobs]
    if not rows:
        return out
    index = torch.tensor(rows, dtype=torch.int64, device=logits.device)
    logp = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)
    drawn = torch.tensor([tokens[i] for i in rows], dtype=torch.int64, device=logits.device)
    chosen = logp.gather(1, drawn[:, None])[:, 0].tolist()
    num_top = max(params[i].top_logprobs for i in rows)
    top_vals: list[list[float]] = []
    top_ids: list[list[int]] = []
    if num_top:
        top = torch.topk(logp, num_top, dim=-1)
        top_vals, top_ids = top.values.tolist(), top.indices.tolist()
    for j, i in enumerate(rows):
        k = params[i].top_logprobs
        pairs = tuple(zip(top_ids[j][:k], top_vals[j][:k], strict=True)) if k else ()
        out[i] = TokenLogprob(chosen[j], pairs)
    return out
