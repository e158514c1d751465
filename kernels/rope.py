"""Rotary position embedding, transformers' rotate-half convention.

Shapes: q (B, Hq, T, D), k (B, Hkv, T, D) with Hq a multiple of Hkv (down to one KV head);
cos, sin (P, D) or (B, P, D), fp32, P >= position_offset + T. D is even; half = D // 2.

Forward, per head and position t (row p = position_offset + t of cos/sin):
    rotate_half(x) = cat(-x[half:], x[:half])
    out = x * cos[p] + rotate_half(x) * sin[p]
Backward is the inverse rotation (the rotation by -angle), i.e. the transpose:
    dx = g * cos[p] + rotate_half_T(g) * sin[p],  rotate_half_T(g) = cat(g[half:], -g[:half])
The math runs in fp32; results are cast back to q's / k's dtype.
"""

from __future__ import annotations

import torch

from kernels.backend import use_triton


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (..., D): cat(-x2, x1) for x = cat(x1, x2)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, offset: int):
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"apply_rope: q and k must be (B, H, T, D), got {tuple(q.shape)}, {tuple(k.shape)}")
    B, Hq, T, D = q.shape
    if k.shape[0] != B or k.shape[2] != T or k.shape[3] != D:
        raise ValueError(f"apply_rope: k {tuple(k.shape)} does not match q {tuple(q.shape)}")
    if Hq % k.shape[1] != 0:
        raise ValueError(f"apply_rope: {Hq} query heads not a multiple of {k.shape[1]} KV heads")
    if D % 2:
        raise ValueError(f"apply_rope: head dim {D} must be even")
    if cos.shape != sin.shape or cos.shape[-1] != D or cos.dim() not in (2, 3):
        raise ValueError(
            f"apply_rope: cos {tuple(cos.shape)} / sin {tuple(sin.shape)} must be (P, {D}) or (B, P, {D})"
        )
    if cos.dim() == 3 and cos.shape[0] != B:
        raise ValueError(f"apply_rope: cos batch {cos.shape[0]} does not match q batch {B}")
    if cos.shape[-2] < offset + T:
        raise ValueError(
            f"apply_rope: cos/sin cover {cos.shape[-2]} positions, need position_offset + T = {offset + T}"
        )
    if len({q.device, k.device, cos.device, sin.device}) != 1:
        raise ValueError("apply_rope: q, k, cos and sin must be on one device")


def apply_rope_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference RoPE in fp32, cast back. Returns (q_rotated, k_rotated), shapes of q and k."""
    _check(q, k, cos, sin, position_offset)
    T = q.shape[2]
    c = cos[..., position_offset : position_offset + T, :].float()
    s = sin[..., position_offset : position_offset + T, :].float()
    if c.dim() == 3:  # (B, T, D) -> (B, 1, T, D), broadcast over heads
        c, s = c.unsqueeze(1), s.unsqueeze(1)
    qf, kf = q.float(), k.float()
    q_out = qf * c + rotate_half(qf) * s
    k_out = kf * c + rotate_half(kf) * s
    return q_out.to(q.dtype), k_out.to(k.dtype)


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_offset: int = 0,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, Hq, T, D) and k (B, Hkv, T, D) by rows [offset, offset+T) of cos/sin."""
    if use_triton(q, k, backend=backend) and _triton_path is not None:
        return _triton_path(q, k, cos, sin, position_offset)
    return apply_rope_ref(q, k, cos, sin, position_offset)


_triton_path = None  # set by the Triton section of this module
