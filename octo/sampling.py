"""Picking the next token from logits: greedy, temperature, top-k and nucleus (top-p) sampling.

    sample_next(logits (B, V) fp32) -> (B,) int64

Used by OctoForCausalLM.generate once per decoding step; check_sampling is also what the
`python -m octo.generate` CLI checks its arguments with before any model loads. Depends on torch
only, so the model imports it at the top.
"""

from __future__ import annotations

import math

import torch


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """ValueError naming the bad argument. NaN passes a plain `< 0` test and then fails deep in
    torch.multinomial, and an infinite temperature samples uniformly: both are refused here."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 or None: no top-k filter), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 or None: no nucleus filter), got {top_p}")


def sample_next(
    logits: torch.Tensor,  # (B, V) fp32
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:  # (B,) int64
    """Pick the next token: greedy at temperature 0, else sample from the tempered distribution
    restricted to the top_k tokens and the smallest set whose probability reaches top_p."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first always stays)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
