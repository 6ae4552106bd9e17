"""Turning logits into next tokens: greedy, temperature, top-k, top-p, per-request seeds."""

from __future__ import annotations

import torch

from workers.engine.messages import SamplingParams


def sample(
    logits: torch.Tensor,  # [S, vocab] float32
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> list[int]:
    """One token per row. Greedy rows take the argmax; the others draw from the filtered
    distribution with their own generator, so a seeded request repeats whatever its batch."""
    out = greedy_tokens(logits)
    for row, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if p.is_greedy:
            continue
        probs = filtered_probs(logits[row], p)
        out[row] = int(torch.multinomial(probs.cpu(), 1, generator=gen).item())
    return out


def greedy_tokens(logits: torch.Tensor) -> list[int]:
    """Each row's argmax (the first on ties; a NaN wins, as in `torch.argmax`). On the CPU
    through numpy: torch's CPU argmax runs ~10-20x slower here (137 us at 64 x 1024, 17.6 ms
    at 64 x 129280 against numpy's 8 us and 1.4 ms)."""
    if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float64):
        out: list[int] = logits.numpy().argmax(axis=-1).tolist()
        return out
    return logits.argmax(dim=-1).tolist()


def filtered_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Probabilities `[vocab]` after temperature, top-k and top-p (nucleus) filtering."""
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = sorted_probs.cumsum(-1) - sorted_probs >= p.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        probs = probs / probs.sum()
    return probs
