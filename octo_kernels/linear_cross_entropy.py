"""Fused linear + cross-entropy: loss(hidden @ weight.T, labels) without the full logits.

Shapes: hidden (N, C), weight (V, C) (the lm_head), labels (N,) int64 (or int32).
The loss is exactly cross_entropy(hidden @ weight.T, labels, ...) of octo_kernels/cross_entropy.py
(same math, same ignore_index / z_loss / reduction rules); with G = dL/dlogits (N, V):
    dL/dhidden = G @ weight          (N, C)
    dL/dweight = G.T @ hidden        (V, C)

Triton path (this file, top to bottom: reference, chunk size, the chunk loop, torch.library ops,
public function):
- the N tokens are walked in chunks of `chunk_rows(N, V, C)` rows, so only one (chunk, V) block
  of logits ever exists. Per chunk: logits = h_c @ W.T (torch, cuBLAS); the Triton cross-entropy
  forward kernel (octo_kernels/cross_entropy.py, HAS_GRAD) writes each row's loss and overwrites the
  row's logits with its gradient (the buffer is ours alone; every element is read before it is
  written); then dL/dh_c = G_c @ W goes into its rows of an fp32 (N, C) result and G_c.T @ h_c
  is added into an fp32 (V, C) accumulator. With "mean"/"sum" the gradients are made during the
  forward (dL/dloss is 1 or 1/count, the count read on the device: no host sync) and saved in
  fp32; the backward only scales them by the incoming scalar and casts them once to the inputs'
  dtypes: 3 matmuls in all, like eager. With "none" the per-row dL/dloss_i is known only in
  backward, so the backward runs the chunk loop again (octo::linear_cross_entropy_bwd) with those
  scales: 4 matmuls.
- matmuls run in hidden's dtype (the public function casts hidden to the autocast dtype under
  autocast, as F.linear would; the weight is cast per call inside the op). The two gradient
  matmuls return fp32 from cuBLAS (torch.mm(..., out_dtype=torch.float32)): no chunk product is
  rounded to bf16 before the fp32 sum, and with fp32 master weights dL/dweight is never rounded
  to bf16 at all (eager autocast rounds it once).
- a 2-byte matmul weight with V not a multiple of 8 is padded with zero rows to a multiple of
  64 (`_matmul_weight`): unaligned rows send cuBLAS to slow kernels.
- peak extra memory: one (chunk, V) logits block in the matmul dtype, the fp32 (V, C)
  accumulator (plus one fp32 (V, C) chunk product where torch cannot accumulate in the matmul
  itself, see _addmm_fp32_), the fp32 (N, C) dL/dhidden, and the weight's low-precision copy
  when it is cast or padded. chunk_rows keeps the block no larger than about twice the weight,
  so the peak is O(V * C + N * C), never O(N * V) (eager holds several (N, V) tensors, fp32
  among them).
Eligible for Triton: hidden fp32/bf16/fp16, weight fp32/bf16/fp16, N > 0, V > 0. Labels outside
[0, V) other than ignore_index give a NaN loss and NaN gradients on the Triton path (see
octo_kernels/cross_entropy.py); the reference raises.
"""

from __future__ import annotations

import functools

import torch

from octo_kernels.backend import triton_available, use_triton
from octo_kernels.cross_entropy import (
    KERNEL_DTYPES,
    ce_forward_launch,
    check_cross_entropy_args,
    cross_entropy_ref,
    reduce_losses,
)

MIN_CHUNK_ELEMENTS = 1 << 24  # logits per chunk allowed whatever the head's size (32 MiB bf16)


def check_linear_args(hidden: torch.Tensor, weight: torch.Tensor) -> None:
    """hidden (N, C) and weight (V, C) agree in C, dtype (unless autocast) and device."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} "
            "must be (N, C) and (V, C)"
        )
    if hidden.device != weight.device:
        raise ValueError(
            f"linear_cross_entropy: hidden on {hidden.device}, weight on {weight.device}; move both"
        )
    if not (hidden.is_floating_point() and weight.is_floating_point()):
        raise ValueError(
            f"linear_cross_entropy: hidden ({hidden.dtype}) and weight ({weight.dtype}) must be "
            "floating point"
        )
    if hidden.dtype != weight.dtype and not torch.is_autocast_enabled(hidden.device.type):
        raise ValueError(
            f"linear_cross_entropy: hidden is {hidden.dtype} but weight is {weight.dtype}; cast "
            "one of them or run under torch.autocast"
        )


def linear_cross_entropy_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    z_loss: float = 0.0,
) -> torch.Tensor:
    """Reference: materialise the (N, V) logits, then cross_entropy_ref. fp32 loss."""
    check_linear_args(hidden, weight)
    logits = hidden @ weight.t()  # (N, V)
    return cross_entropy_ref(logits, labels, ignore_index, reduction, z_loss)


# ----------------------------------------------------------------------------------------------
# Chunk size and the chunk loop (real tensors only; shapes already checked)
# ----------------------------------------------------------------------------------------------


def chunk_rows(n_rows: int, vocab: int, hidden: int) -> int:
    """Rows per chunk: the largest power of two whose (chunk, V) logits block holds at most
    max(2 * V * C, 2^24) elements (twice the weight, or 16M elements for a small head), at least
    16 (a matmul tile), at most N.

    Why: peak memory stays O(V * C) whatever N is (eager holds several (N, V) tensors), while
    each chunk's matmuls stay large for cuBLAS (chunk = 1024 rows at C = 768, V = 50257) and the
    fp32 (V, C) accumulation, one read + write of the accumulator per chunk, is paid N / 1024
    times rather than N / 128 times; a small head (V * C < 8M) is not chunked at all below 16M
    logits.
    """
    if n_rows <= 0 or vocab <= 0 or hidden <= 0:
        raise ValueError(f"chunk_rows: sizes must be positive, got N={n_rows} V={vocab} C={hidden}")
    budget = max(2 * vocab * hidden, MIN_CHUNK_ELEMENTS) // vocab  # rows that fit the budget
    chunk = 1 << (max(budget, 16).bit_length() - 1)  # largest power of two <= budget, >= 16
    return min(chunk, n_rows)


@functools.cache
def _cuda_fp32_out_matmuls() -> tuple[bool, bool]:
    """Whether this torch has, for bf16 CUDA operands, (1) torch.mm(a, b, out_dtype=fp32) and
    (2) torch.addmm(acc, a, b, out_dtype=fp32, out=acc) accumulating into an fp32 acc (cuBLAS
    with fp32 output and beta = 1; newer than (1)). Probed once on a small product, values
    checked, so a torch without them (or with a different aliasing rule) takes the fallback."""
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(64, 32, device="cuda", generator=g).to(torch.bfloat16)
    b = torch.randn(32, 16, device="cuda", generator=g).to(torch.bfloat16)
    want = a.double() @ b.double()
    try:
        mm_ok = torch.allclose(torch.mm(a, b, out_dtype=torch.float32).double(), want, atol=1e-4)
    except (TypeError, RuntimeError):
        return False, False
    try:
        acc = want.float()
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        add_ok = torch.allclose(acc.double(), 2 * want, atol=1e-4)
    except (TypeError, RuntimeError):
        add_ok = False
    return mm_ok, mm_ok and add_ok


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b accumulated in fp32 and returned in fp32, whatever the (equal) input dtype: on CUDA
    cuBLAS writes the fp32 result of the low-precision matmul directly (same speed, no rounding to
    bf16); on CPU (tests) the operands are upcast. Torch without out_dtype on CUDA: the product is
    rounded once to the input dtype, then upcast."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if a.is_cuda:
        if _cuda_fp32_out_matmuls()[0]:
            return torch.mm(a, b, out_dtype=torch.float32)
        return torch.mm(a, b).float()
    return torch.mm(a.float(), b.float())


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b, in the matmul's epilogue where torch allows it (no (V, C) temporary,
    one read + write of acc), else through _mm_fp32 and an add."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.is_cuda and _cuda_fp32_out_matmuls()[1]:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.add_(_mm_fp32(a, b))


def _matmul_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The lm_head weight (V, C) as the matmuls take it: in `dtype`, and for a 2-byte dtype with
    V not a multiple of 8, padded with zero rows to Vp = V rounded up to 64.

    Why: with V = 50257 a bf16 logits row is not 16-byte aligned and cuBLAS falls back to slow
    kernels (H100: eager linear + CE took 7.6x longer at V = 50257 than at 16000, for 3.1x the
    vocab; bench/NOTES.md). Padded, every matmul runs on aligned rows; the padding's logits and
    their gradients are exactly 0, so they change no result. The copy costs V * C elements, the
    same as the cast it replaces when weight's dtype differs (fp32 master weights under autocast).
    """
    vocab = weight.shape[0]
    if torch.finfo(dtype).bits > 16 or vocab % 8 == 0:
        return weight.to(dtype)  # a copy only when weight's dtype differs
    w = weight.new_zeros((-(-vocab // 64) * 64, weight.shape[1]), dtype=dtype)
    w[:vocab] = weight
    return w


def _chunk_loop(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    z_loss: float,
    scale: torch.Tensor | None,
    need_dh: bool,
    need_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-row losses (N,) fp32 and, when `scale` is given, fp32 dL/dhidden (N, C) (if need_dh)
    and fp32 dL/dweight (V, C) (if need_dw) for dL/dloss_i = scale[i] (scale: fp32, (N,) of any
    stride, or one element for every row)."""
    n_rows, n_hidden = hidden.shape
    vocab = weight.shape[0]
    want_grad = scale is not None and (need_dh or need_dw)
    with torch.autocast(hidden.device.type, enabled=False):
        w = _matmul_weight(weight, hidden.dtype)  # (V or Vp, C)
        labels = labels.contiguous()
        loss = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
        dh = None
        if want_grad and need_dh:
            dh = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
        dw = None  # fp32 (V, C), started by the first chunk
        if want_grad and need_dw and n_rows == 0:
            dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        chunk = chunk_rows(n_rows, vocab, n_hidden) if n_rows else 1
        for start in range(0, n_rows, chunk):
            stop = min(start + chunk, n_rows)
            h_c = hidden[start:stop]  # (n, C)
            padded = torch.mm(h_c, w.t())  # (n, Vp), contiguous, in hidden's dtype
            logits = padded[:, :vocab]  # (n, V); columns past V are exactly 0 (zero rows of w)
            if not want_grad:
                loss[start:stop], _ = ce_forward_launch(
                    logits, labels[start:stop], ignore_index, z_loss
                )
                continue
            s_c = scale if scale.numel() == 1 else scale[start:stop]
            # in place: logits becomes G_c = dL/dlogits of this chunk (padding columns stay 0)
            loss[start:stop], _ = ce_forward_launch(
                logits, labels[start:stop], ignore_index, z_loss, grad_scale=s_c
            )
            if need_dh:
                dh[start:stop] = _mm_fp32(padded, w)  # (n, C)
            if need_dw:  # (Vp, C) fp32
                if dw is None:
                    dw = _mm_fp32(padded.t(), h_c)
                else:
                    _addmm_fp32_(dw, padded.t(), h_c)
            del logits, padded
    return loss, dh, (None if dw is None else dw[:vocab])  # (V, C): the padding's rows dropped


def _mean_scale(labels: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    """dL/dloss_i of the reduction as one fp32 element: 1 ("sum") or 1 / max(count, 1) ("mean"),
    the count taken on the device."""
    if reduction == "sum":
        return torch.ones(1, dtype=torch.float32, device=labels.device)
    count = (labels != ignore_index).sum().clamp(min=1)
    return (1.0 / count.to(torch.float32)).reshape(1)


# ----------------------------------------------------------------------------------------------
# torch.library ops: opaque to torch.compile (fake impls give shapes), differentiable
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("octo::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    reduction: str,
    z_loss: float,
    need_dh: bool,
    need_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (loss fp32: () for "mean"/"sum", (N,) for "none"; dL/dhidden (N, C) fp32 or empty;
    dL/dweight (V, C) fp32 or empty). With "mean"/"sum" and need_dh/need_dw, the gradients of the
    loss itself (dL/dloss = 1) come out of the forward, in fp32 so that the backward's scaling
    by dL/dloss rounds to the parameters' dtype only once; with "none" they are empty (the
    backward recomputes them with the per-row dL/dloss_i)."""
    with_grad = reduction != "none" and (need_dh or need_dw)
    scale = _mean_scale(labels, ignore_index, reduction) if with_grad else None
    per_row, dh, dw = _chunk_loop(
        hidden, weight, labels, ignore_index, z_loss, scale, need_dh, need_dw
    )
    loss = reduce_losses(per_row, labels != ignore_index, reduction)
    empty = hidden.new_empty(0, dtype=torch.float32)
    return loss, (dh if dh is not None else empty), (dw if dw is not None else empty.clone())


@linear_cross_entropy_fwd.register_fake
def _(hidden, weight, labels, ignore_index, reduction, z_loss, need_dh, need_dw):
    with_grad = reduction != "none" and (need_dh or need_dw)
    shape = (hidden.shape[0],) if reduction == "none" else ()
    loss = hidden.new_empty(shape, dtype=torch.float32)
    dh = hidden.new_empty(hidden.shape if with_grad and need_dh else (0,), dtype=torch.float32)
    dw = hidden.new_empty(weight.shape if with_grad and need_dw else (0,), dtype=torch.float32)
    return loss, dh, dw


@torch.library.custom_op("octo::linear_cross_entropy_bwd", mutates_args=())
def linear_cross_entropy_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    dloss: torch.Tensor,
    ignore_index: int,
    z_loss: float,
    need_dh: bool,
    need_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recompute the chunks with dL/dloss_i = dloss (N,) (any stride, also 0) -> dL/dhidden
    (N, C) in hidden's dtype (or empty), dL/dweight (V, C) in weight's dtype (or empty)."""
    _, dh, dw = _chunk_loop(
        hidden, weight, labels, ignore_index, z_loss, dloss.float(), need_dh, need_dw
    )
    dh = dh.to(hidden.dtype) if dh is not None else hidden.new_empty(0)
    dw = dw.to(weight.dtype) if dw is not None else weight.new_empty(0)
    return dh, dw


@linear_cross_entropy_bwd.register_fake
def _(hidden, weight, labels, dloss, ignore_index, z_loss, need_dh, need_dw):
    return (
        hidden.new_empty(hidden.shape if need_dh else (0,)),
        weight.new_empty(weight.shape if need_dw else (0,)),
    )


def _setup_context(ctx, inputs, output):
    hidden, weight, labels, ignore_index, reduction, z_loss, _need_dh, _need_dw = inputs
    _loss, dh, dw = output
    ctx.mark_non_differentiable(dh, dw)
    ctx.set_materialize_grads(False)  # no (V, C) zeros for the gradients of dh, dw
    ctx.save_for_backward(hidden, weight, labels, dh, dw)
    ctx.ignore_index, ctx.reduction, ctx.z_loss = ignore_index, reduction, z_loss


def _backward(ctx, dloss, _ddh, _ddw):
    hidden, weight, labels, dh, dw = ctx.saved_tensors
    need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if dloss is None or not (need_dh or need_dw):
        return None, None, None, None, None, None, None, None
    made_in_forward = (not need_dh or dh.numel() > 0) and (not need_dw or dw.numel() > 0)
    if ctx.reduction != "none" and made_in_forward:
        gh = (dh * dloss).to(hidden.dtype) if need_dh else None
        gw = (dw * dloss).to(weight.dtype) if need_dw else None
        return gh, gw, None, None, None, None, None, None
    # "none", or a forward that was asked not to make the gradients: recompute the chunks
    rows = dloss
    if ctx.reduction != "none":
        rows = dloss * _mean_scale(labels, ctx.ignore_index, ctx.reduction)  # (1,)
        rows = rows.expand(hidden.shape[0])
    gh, gw = linear_cross_entropy_bwd(
        hidden, weight, labels, rows, ctx.ignore_index, ctx.z_loss, need_dh, need_dw
    )
    return (gh if need_dh else None), (gw if need_dw else None), None, None, None, None, None, None


linear_cross_entropy_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------


def triton_eligible(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when the fused path handles these inputs (else the reference runs)."""
    return (
        triton_available()
        and hidden.dtype in KERNEL_DTYPES
        and weight.dtype in KERNEL_DTYPES
        and hidden.shape[0] > 0
        and weight.shape[0] > 0
    )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    z_loss: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """loss(hidden (N, C) @ weight (V, C).T, labels (N,)); fp32 result. See module docstring.

    reduction "mean" (over non-ignored rows) | "sum" -> scalar, "none" -> (N,). backend: None
    (OCTO_KERNELS), "auto", "triton" or "torch"; see octo_kernels.backend. Under autocast the
    matmuls run in the autocast dtype, as `hidden @ weight.T` would.
    """
    check_linear_args(hidden, weight)
    check_cross_entropy_args(hidden[:, :1], labels, ignore_index, reduction)
    if use_triton(hidden, weight, labels, backend=backend) and triton_eligible(hidden, weight):
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):
            hidden = hidden.to(torch.get_autocast_dtype(device_type))
        grad_on = torch.is_grad_enabled()
        loss, _dh, _dw = linear_cross_entropy_fwd(
            hidden,
            weight,
            labels,
            int(ignore_index),
            reduction,
            float(z_loss),
            grad_on and hidden.requires_grad,
            grad_on and weight.requires_grad,
        )
        return loss
    return linear_cross_entropy_ref(hidden, weight, labels, ignore_index, reduction, z_loss)
