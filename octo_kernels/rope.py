"""Rotary position embedding, transformers' rotate-half convention.

Shapes: q (B, Hq, T, D), k (B, Hkv, T, D) with Hq a multiple of Hkv (down to one KV head);
cos, sin (P, D) or (B, P, D), fp32, P >= position_offset + T. D is even; half = D // 2.

Forward, per head and position t (row p = position_offset + t of cos/sin), x = cat(x1, x2):
    rotate_half(x) = cat(-x2, x1)
    out = x * cos[p] + rotate_half(x) * sin[p]
    i.e. out1 = x1 * c1 - x2 * s1,  out2 = x2 * c2 + x1 * s2   (c = cat(c1, c2), s = cat(s1, s2))
Backward is the transpose of that linear map:
    dx1 = g1 * c1 + g2 * s2,  dx2 = g2 * c2 - g1 * s1
With rotate-half tables (c1 == c2, s1 == s2, c^2 + s^2 = 1) this is the inverse rotation, the
rotation by -angle. The math runs in fp32; results are cast back to q's / k's dtype.

Triton path (reference, kernel, launcher, torch.library op, public function):
- one launch rotates q and k: each program takes BLOCK_T tokens (b, t), loads their cos/sin rows
  once and rotates every query head and every KV head of those tokens as (BLOCK_T, H, half) tiles.
- q/k may have any strides with a contiguous last dim, e.g. the (B, T, H, D) memory of
  `proj(x).view(B, T, H, D).transpose(1, 2)`; outputs are allocated `empty_like` (same layout),
  so no transpose copy is made in either direction. Nothing is written in place.
- the op octo::rope(q, k, cos, sin, position_offset, transpose) is a `torch.library.custom_op`
  with a fake implementation (no graph break under torch.compile), or with OCTO_TRITON_OP=1 a
  `triton_op` that Inductor traces into (octo_kernels.backend); its backward is the same op with
  `transpose` flipped. Inputs whose last dim is not contiguous (e.g. the stride-0 expanded
  gradient a compiled graph can hand over) are made contiguous inside the op.
Eligible: q, k fp32/bf16/fp16, cos/sin floating and not requiring grad (the kernel does not
differentiate the tables), non-empty, Hq * D and Hkv * D small enough for one tile. Anything else
runs the reference.
"""

from __future__ import annotations

import torch

from octo_kernels.backend import interpreting, launcher, library_op, triton_available, use_triton

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HEADS_X_HALF = 16384  # next_pow2(H) * next_pow2(D / 2) per tile; beyond it the reference runs


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (..., D): cat(-x2, x1) for x = cat(x1, x2)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, offset: int):
    """Shape/dtype/device checks shared by every path: one line naming the problem."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"apply_rope: q and k must be (B, H, T, D), got {tuple(q.shape)}, {tuple(k.shape)}"
        )
    B, Hq, T, D = q.shape
    if k.shape[0] != B or k.shape[2] != T or k.shape[3] != D:
        raise ValueError(f"apply_rope: k {tuple(k.shape)} does not match q {tuple(q.shape)}")
    if k.shape[1] == 0 or Hq % k.shape[1] != 0:
        raise ValueError(f"apply_rope: {Hq} query heads not a multiple of {k.shape[1]} KV heads")
    if D % 2:
        raise ValueError(f"apply_rope: head dim {D} must be even")
    if cos.shape != sin.shape or cos.shape[-1] != D or cos.dim() not in (2, 3):
        raise ValueError(
            f"apply_rope: cos {tuple(cos.shape)} / sin {tuple(sin.shape)} must be (P, {D}) "
            f"or (B, P, {D})"
        )
    if cos.dim() == 3 and cos.shape[0] != B:
        raise ValueError(f"apply_rope: cos batch {cos.shape[0]} does not match q batch {B}")
    if offset < 0:
        raise ValueError(f"apply_rope: position_offset {offset} must be >= 0")
    if cos.shape[-2] < offset + T:
        raise ValueError(
            f"apply_rope: cos/sin cover {cos.shape[-2]} positions, need position_offset + T = "
            f"{offset + T}; build the tables for more positions"
        )
    if len({q.device, k.device, cos.device, sin.device}) != 1:
        raise ValueError(
            f"apply_rope: q ({q.device}), k ({k.device}), cos ({cos.device}) and sin "
            f"({sin.device}) must be on one device"
        )
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not t.is_floating_point():
            raise ValueError(f"apply_rope: {name} must be floating point, got {t.dtype}")


def apply_rope_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference RoPE in fp32 (fp64 when q or k is fp64), cast back. Returns (q_rotated,
    k_rotated), shapes of q and k. fp64 stays fp64 so tests can compute a more exact truth."""
    _check(q, k, cos, sin, position_offset)
    T = q.shape[2]
    acc = torch.promote_types(torch.promote_types(q.dtype, k.dtype), torch.float32)
    c = cos[..., position_offset : position_offset + T, :].to(acc)
    s = sin[..., position_offset : position_offset + T, :].to(acc)
    if c.dim() == 3:  # (B, T, D) -> (B, 1, T, D), broadcast over heads
        c, s = c.unsqueeze(1), s.unsqueeze(1)
    qf, kf = q.to(acc), k.to(acc)
    q_out = qf * c + rotate_half(qf) * s
    k_out = kf * c + rotate_half(kf) * s
    return q_out.to(q.dtype), k_out.to(k.dtype)


# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    from octo_kernels.backend import cast_like

    @triton.jit
    def _rope_heads(
        X,  # input base pointer
        O,  # output base pointer
        x_tok,  # (BLOCK_T,) int64 offsets of each token's head 0 in X
        o_tok,  # (BLOCK_T,) int64 offsets in O
        stride_xh,
        stride_oh,
        c1,  # (BLOCK_T, 1, HALF_PAD) fp32 cos[p, :half]
        c2,  # cos[p, half:]
        s1,  # sin[p, :half]
        s2,  # sin[p, half:]
        tok_ok,  # (BLOCK_T,) bool
        H: tl.constexpr,
        H_PAD: tl.constexpr,
        HALF: tl.constexpr,
        HALF_PAD: tl.constexpr,
        TRANSPOSE: tl.constexpr,
    ):
        """Rotate all H heads of BLOCK_T tokens: a (BLOCK_T, H_PAD, HALF_PAD) tile per half."""
        h = tl.arange(0, H_PAD).to(tl.int64)
        d = tl.arange(0, HALF_PAD)
        mask = tok_ok[:, None, None] & (h < H)[None, :, None] & (d < HALF)[None, None, :]
        x_ptr = X + x_tok[:, None, None] + (h * stride_xh)[None, :, None] + d[None, None, :]
        x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
        if TRANSPOSE:
            o1 = x1 * c1 + x2 * s2
            o2 = x2 * c2 - x1 * s1
        else:
            o1 = x1 * c1 - x2 * s1
            o2 = x2 * c2 + x1 * s2
        o_ptr = O + o_tok[:, None, None] + (h * stride_oh)[None, :, None] + d[None, None, :]
        tl.store(o_ptr, cast_like(o1, O), mask=mask)
        tl.store(o_ptr + HALF, cast_like(o2, O), mask=mask)

    @triton.jit
    def _rope_kernel(
        Q,  # (B, HQ, T, D), strides sq_*, last dim contiguous
        K,  # (B, HK, T, D)
        COS,  # (P, D) or (B, P, D): strides sc_b (0 for 2-D), sc_p
        SIN,
        QO,  # like Q, strides sqo_*
        KO,  # like K
        n_tok,  # B * T
        T,
        pos_offset,
        sq_b, sq_h, sq_t,
        sk_b, sk_h, sk_t,
        sqo_b, sqo_h, sqo_t,
        sko_b, sko_h, sko_t,
        sc_b, sc_p,
        ss_b, ss_p,
        HQ: tl.constexpr,
        HK: tl.constexpr,
        HQ_PAD: tl.constexpr,
        HK_PAD: tl.constexpr,
        HALF: tl.constexpr,
        HALF_PAD: tl.constexpr,
        BLOCK_T: tl.constexpr,
        TRANSPOSE: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0).to(tl.int64)
        tok = pid * BLOCK_T + tl.arange(0, BLOCK_T)  # flat (b, t) token index, int64
        tok_ok = tok < n_tok
        b = tok // T
        t = tok % T
        p = t + pos_offset

        d = tl.arange(0, HALF_PAD)
        cs_mask = tok_ok[:, None] & (d < HALF)[None, :]
        c_ptr = COS + (b * sc_b + p * sc_p)[:, None] + d[None, :]
        s_ptr = SIN + (b * ss_b + p * ss_p)[:, None] + d[None, :]
        c1 = tl.load(c_ptr, mask=cs_mask, other=0.0).to(tl.float32)[:, None, :]
        c2 = tl.load(c_ptr + HALF, mask=cs_mask, other=0.0).to(tl.float32)[:, None, :]
        s1 = tl.load(s_ptr, mask=cs_mask, other=0.0).to(tl.float32)[:, None, :]
        s2 = tl.load(s_ptr + HALF, mask=cs_mask, other=0.0).to(tl.float32)[:, None, :]

        _rope_heads(
            Q, QO, b * sq_b + t * sq_t, b * sqo_b + t * sqo_t, sq_h, sqo_h,
            c1, c2, s1, s2, tok_ok, HQ, HQ_PAD, HALF, HALF_PAD, TRANSPOSE,
        )  # fmt: skip
        _rope_heads(
            K, KO, b * sk_b + t * sk_t, b * sko_b + t * sko_t, sk_h, sko_h,
            c1, c2, s1, s2, tok_ok, HK, HK_PAD, HALF, HALF_PAD, TRANSPOSE,
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Launcher (real tensors only; shapes already checked)
# ----------------------------------------------------------------------------------------------


def _lastdim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Keep any layout whose last dim has stride 1 (the kernel takes strides); copy otherwise."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _tiles(n_tok: int, hq: int, hk: int, half: int) -> tuple[int, int, int, int, int]:
    """(HQ_PAD, HK_PAD, HALF_PAD, BLOCK_T, num_warps): ~8K elements per program on a GPU,
    up to 64K under the interpreter (fewer, slower programs)."""
    hq_pad, hk_pad = triton.next_power_of_2(hq), triton.next_power_of_2(hk)
    half_pad = triton.next_power_of_2(half)
    per_tok = (hq_pad + hk_pad) * 2 * half_pad
    target = 65536 if interpreting() else 8192
    block_t = 1
    while block_t * 2 * per_tok <= target and block_t < min(64, n_tok):
        block_t *= 2
    num_warps = min(16, max(1, triton.next_power_of_2(block_t * per_tok // 1024)))
    return hq_pad, hk_pad, half_pad, block_t, num_warps


def _rope_launch(q, k, cos, sin, position_offset: int, transpose: bool):
    q, k = _lastdim_contiguous(q), _lastdim_contiguous(k)
    cos, sin = _lastdim_contiguous(cos), _lastdim_contiguous(sin)
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    B, HQ, T, D = q.shape
    HK = k.shape[1]
    sc = (0, cos.stride(0)) if cos.dim() == 2 else (cos.stride(0), cos.stride(1))
    ss = (0, sin.stride(0)) if sin.dim() == 2 else (sin.stride(0), sin.stride(1))
    hq_pad, hk_pad, half_pad, block_t, num_warps = _tiles(B * T, HQ, HK, D // 2)
    grid = (triton.cdiv(B * T, block_t),)
    launcher(_rope_kernel)[grid](
        q, k, cos, sin, qo, ko, B * T, T, position_offset,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        qo.stride(0), qo.stride(1), qo.stride(2),
        ko.stride(0), ko.stride(1), ko.stride(2),
        *sc, *ss,
        HQ=HQ, HK=HK, HQ_PAD=hq_pad, HK_PAD=hk_pad, HALF=D // 2, HALF_PAD=half_pad,
        BLOCK_T=block_t, TRANSPOSE=transpose, num_warps=num_warps,
    )  # fmt: skip
    return qo, ko


# ----------------------------------------------------------------------------------------------
# torch.library op: opaque to torch.compile (fake impl gives shapes and strides), differentiable
# ----------------------------------------------------------------------------------------------


def _rope_fake(q, k, cos, sin, position_offset, transpose):
    return torch.empty_like(_lastdim_contiguous(q)), torch.empty_like(_lastdim_contiguous(k))


@library_op("octo::rope", fake=_rope_fake)
def rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_offset: int,
    transpose: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, Hq, T, D) and k (B, Hkv, T, D) by rows [offset, offset + T) of cos/sin;
    transpose=True applies the transposed map (the backward). Outputs: layouts of q and k."""
    return _rope_launch(q, k, cos, sin, position_offset, transpose)


def _setup_context(ctx, inputs, output):
    _q, _k, cos, sin, position_offset, transpose = inputs
    ctx.save_for_backward(cos, sin)
    ctx.position_offset = position_offset
    ctx.transpose = transpose


def _backward(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    dq_in, dk_in = rope(dq, dk, cos, sin, ctx.position_offset, not ctx.transpose)
    return dq_in, dk_in, None, None, None, None


rope.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------


def triton_eligible(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """True when the fused kernel handles these (checked) inputs; else the reference runs."""
    if not triton_available():
        return False
    if q.dtype not in KERNEL_DTYPES or k.dtype not in KERNEL_DTYPES:
        return False
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        return False  # the kernel gives no gradient for the tables; the reference does
    half_pad = triton.next_power_of_2(q.shape[-1] // 2)
    heads_pad = triton.next_power_of_2(q.shape[1])
    return q.numel() > 0 and heads_pad * half_pad <= MAX_HEADS_X_HALF


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_offset: int = 0,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, Hq, T, D) and k (B, Hkv, T, D) by rows [offset, offset+T) of cos/sin.

    cos, sin: (P, D) or (B, P, D), P >= position_offset + T (position_offset > 0 when decoding
    with a KV cache). Returns (q_rotated, k_rotated) in q's and k's dtypes. backend: None
    (OCTO_KERNELS), "auto", "triton" or "torch"; inputs the kernel does not handle (see
    `triton_eligible`) run the reference.
    """
    _check(q, k, cos, sin, position_offset)
    if use_triton(q, k, cos, sin, backend=backend) and triton_eligible(q, k, cos, sin):
        return rope(q, k, cos, sin, position_offset, False)
    return apply_rope_ref(q, k, cos, sin, position_offset)
