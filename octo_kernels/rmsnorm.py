"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * w.

Shapes: x (..., C), w (C,), y like x (x's dtype). Rows are normalised independently;
R = prod(leading dims). x and w may have different float dtypes; the math is fp32 either way.

Forward, per row (fp32 math whatever the input dtype):
    rstd = 1 / sqrt(sum_c x_c^2 / C + eps)
    y_c  = x_c * rstd * w_c
Backward, with g = dL/dy and xhat = x * rstd:
    dL/dw_c = sum_rows g_c * xhat_c
    dL/dx_c = rstd * (g_c * w_c - xhat_c * mean_c(g * w * xhat))

Triton path (this file, top to bottom: reference, kernels, launchers, torch.library ops, public
function):
- forward: one program normalises ROWS rows held in registers as a (ROWS, BLOCK_C) tile
  (BLOCK_C = next_pow2(C)); x is read once, y written once, rstd (R,) fp32 saved for backward.
- backward: a persistent grid of about one wave (2 programs per SM); each walks row tiles
  grid-stride (prefetching the next tile's dy and x into shared memory while it computes this
  one), writes dx and accumulates g * xhat in an fp32 register tile, then stores one fp32 partial
  row of dL/dw (G, C). The (G, C) partials are summed in fp32 and cast to w's dtype: no atomics,
  deterministic. (Liger-Kernel's backward has the same partials; the prefetch is quack's idea.)
- both are `torch.library.custom_op`s (octo::rms_norm_fwd / octo::rms_norm_bwd) with fake
  implementations, so `torch.compile(fullgraph=True)` keeps them as opaque calls (no graph break);
  with OCTO_TRITON_OP=1 they are `triton_op`s that Inductor traces into (octo_kernels.backend).
  Inputs are made last-dim-contiguous inside the ops: a compiled graph may hand the backward an
  expanded stride-0 gradient even where the caller wrote `.contiguous()`.
Eligible: x and w on one device, x fp32/bf16/fp16, w floating, 0 < C <= MAX_HIDDEN, x non-empty.
Anything else runs the reference (same result, no fused kernel).
"""

from __future__ import annotations

import functools

import torch

from octo_kernels.backend import interpreting, launcher, library_op, triton_available, use_triton

MAX_HIDDEN = 32768  # one row lives in registers; beyond this the reference runs
BWD_PIPELINE_SMEM = 128 * 1024  # shared memory the backward may use to prefetch the next tile
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_args(x: torch.Tensor, weight: torch.Tensor) -> None:
    """Shape/dtype/device checks shared by every path: one line naming the problem."""
    if weight.dim() != 1 or x.dim() == 0 or x.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"rms_norm: weight shape {tuple(weight.shape)} does not match hidden size "
            f"{x.shape[-1] if x.dim() else None} of x {tuple(x.shape)}; weight must be (C,)"
        )
    if x.device != weight.device:
        raise ValueError(f"rms_norm: x on {x.device} but weight on {weight.device}; move both")
    if not (x.is_floating_point() and weight.is_floating_point()):
        raise ValueError(
            f"rms_norm: x ({x.dtype}) and weight ({weight.dtype}) must be floating point"
        )


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Reference RMSNorm: fp32 math (fp64 for fp64 x), cast back to x's dtype. x (..., C), w (C,).

    fp64 inputs stay fp64 so tests can compute a truth more exact than the fp32 kernels."""
    _check_args(x, weight)
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    rstd = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (xf * rstd * weight.to(xf.dtype)).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    from octo_kernels.backend import cast_like

    @triton.jit
    def _rms_norm_fwd_kernel(
        X,  # (R, C) row stride stride_x, last dim contiguous
        W,  # (C,)
        Y,  # (R, C) row stride stride_y
        RSTD,  # (R,) fp32
        n_rows,
        stride_x,
        stride_y,
        eps,
        N_COLS: tl.constexpr,
        BLOCK_C: tl.constexpr,
        ROWS: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * ROWS + tl.arange(0, ROWS)  # (ROWS,) int64
        cols = tl.arange(0, BLOCK_C)
        row_ok = rows < n_rows
        col_ok = cols < N_COLS
        mask = row_ok[:, None] & col_ok[None, :]

        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)

        rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / N_COLS + eps)  # (ROWS,)
        y = x * rstd[:, None] * w[None, :]
        tl.store(Y + rows[:, None] * stride_y + cols[None, :], cast_like(y, Y), mask=mask)
        tl.store(RSTD + rows, rstd, mask=row_ok)

    @triton.jit
    def _rms_norm_bwd_kernel(
        DY,  # (R, C) row stride stride_dy
        X,  # (R, C) row stride stride_x
        W,  # (C,)
        RSTD,  # (R,) fp32
        DX,  # (R, C) row stride stride_dx
        DW_PART,  # (G, C) fp32: one partial dL/dw row per program
        n_rows,
        stride_dy,
        stride_x,
        stride_dx,
        N_COLS: tl.constexpr,
        BLOCK_C: tl.constexpr,
        ROWS: tl.constexpr,
        NUM_STAGES: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        n_prog = tl.num_programs(0)
        cols = tl.arange(0, BLOCK_C)
        col_ok = cols < N_COLS
        dw_acc = tl.zeros((ROWS, BLOCK_C), dtype=tl.float32)

        # grid-stride over row tiles: tile pid + i * n_prog (past the end: fully masked)
        # NUM_STAGES = 2: the next tile's dy and x stream into shared memory (cp.async) while
        # this one is computed, so more bytes are in flight than registers alone could hold.
        for i in tl.range(0, tl.cdiv(tl.cdiv(n_rows, ROWS), n_prog), num_stages=NUM_STAGES):
            rows = (pid + i * n_prog) * ROWS + tl.arange(0, ROWS)
            row_ok = rows < n_rows
            mask = row_ok[:, None] & col_ok[None, :]
            dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0)
            dy = dy.to(tl.float32)
            x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
            x = x.to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
            w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)  # L1-resident

            xhat = x * rstd[:, None]
            gw = dy * w[None, :]
            c = tl.sum(gw * xhat, axis=1) / N_COLS  # (ROWS,) mean_c(g * w * xhat)
            dx = (gw - xhat * c[:, None]) * rstd[:, None]
            tl.store(
                DX + rows[:, None] * stride_dx + cols[None, :],
                cast_like(dx, DX),
                mask=mask,
            )
            dw_acc += dy * xhat  # masked rows/cols are 0

        tl.store(DW_PART + pid * N_COLS + cols, tl.sum(dw_acc, axis=0), mask=col_ok)


# ----------------------------------------------------------------------------------------------
# Launchers (real tensors only; shapes already checked)
# ----------------------------------------------------------------------------------------------


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., C) -> (R, C) with a contiguous last dim; copies only when it must."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _tiles(n_cols: int) -> tuple[int, int, int, int]:
    """(BLOCK_C, ROWS, fwd num_warps, bwd num_warps) for a hidden size.

    ~4K elements per program on a GPU; ~16 elements per thread forward, ~8 backward, where each
    thread also holds its share of the dw accumulator (sm_90 compiles: C=4096 backward with 16
    warps takes 64 registers and no spills; with 8 warps 98 registers and half the warps per SM).
    Under the interpreter, bigger tiles (fewer, slower programs)."""
    block_c = triton.next_power_of_2(n_cols)
    target = 16384 if interpreting() else 4096
    rows = max(1, min(32 if interpreting() else 16, target // block_c))
    fwd_warps = min(32, max(1, (rows * block_c) // 512))
    bwd_warps = min(32, max(4, (rows * block_c) // 256))
    return block_c, rows, fwd_warps, bwd_warps


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _bwd_grid_cap(device: torch.device) -> int:
    """Upper bound on backward programs (= rows of dL/dw partials)."""
    if device.type == "cuda":
        return 2 * _sm_count(device.index if device.index is not None else 0)  # ~ one wave
    return 4  # interpreter: a few programs, each looping over several tiles


def _fwd_launch(x: torch.Tensor, weight: torch.Tensor, eps: float):
    x2 = _rows(x)
    n_rows, n_cols = x2.shape
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    block_c, rows, num_warps, _ = _tiles(n_cols)
    grid = (triton.cdiv(n_rows, rows),)
    launcher(_rms_norm_fwd_kernel)[grid](
        x2, weight.contiguous(), y, rstd, n_rows, x2.stride(0), n_cols, eps,
        N_COLS=n_cols, BLOCK_C=block_c, ROWS=rows, num_warps=num_warps,
    )  # fmt: skip
    return y, rstd


def _bwd_launch(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor):
    dy2, x2 = _rows(dy), _rows(x)
    n_rows, n_cols = x2.shape
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block_c, rows, _, num_warps = _tiles(n_cols)
    n_prog = max(1, min(triton.cdiv(n_rows, rows), _bwd_grid_cap(x.device)))
    dw_part = torch.empty((n_prog, n_cols), dtype=torch.float32, device=x.device)
    tile_bytes = rows * block_c * (dy2.element_size() + x2.element_size())
    stages = 2 if 2 * tile_bytes <= BWD_PIPELINE_SMEM else 1
    launcher(_rms_norm_bwd_kernel)[(n_prog,)](
        dy2, x2, weight.contiguous(), rstd.contiguous(), dx, dw_part,
        n_rows, dy2.stride(0), x2.stride(0), n_cols,
        N_COLS=n_cols, BLOCK_C=block_c, ROWS=rows, NUM_STAGES=stages, num_warps=num_warps,
    )  # fmt: skip
    dw = dw_part.sum(dim=0).to(weight.dtype)
    return dx, dw


# ----------------------------------------------------------------------------------------------
# torch.library ops: opaque to torch.compile (fake impls give shapes), differentiable
# ----------------------------------------------------------------------------------------------


def _fwd_fake(x, weight, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=torch.float32)


@library_op("octo::rms_norm_fwd", fake=_fwd_fake)
def rms_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., C), weight (C,) -> y (..., C) contiguous in x's dtype, rstd (...) fp32."""
    return _fwd_launch(x, weight, eps)


def _bwd_fake(dy, x, weight, rstd):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


@library_op("octo::rms_norm_bwd", fake=_bwd_fake)
def rms_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """dy, x (..., C), weight (C,), rstd (...) fp32 -> dx (..., C) in x's dtype, dw (C,)."""
    return _bwd_launch(dy, x, weight, rstd)


def _setup_context(ctx, inputs, output):
    x, weight, _eps = inputs
    _y, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(x, weight, rstd)


def _backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = rms_norm_bwd(dy, x, weight, rstd)
    return dx, dw, None


rms_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------


def triton_eligible(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when the fused kernel handles these inputs (else the reference runs)."""
    return (
        triton_available()
        and x.dtype in KERNEL_DTYPES
        and weight.dtype in KERNEL_DTYPES
        and 0 < x.shape[-1] <= MAX_HIDDEN
        and x.numel() > 0
    )


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, backend: str | None = None
) -> torch.Tensor:
    """RMSNorm over the last dim. x (..., C), weight (C,) -> (..., C) in x's dtype.

    backend: None (OCTO_KERNELS), "auto", "triton" or "torch"; see octo_kernels.backend. Inputs the
    kernel does not handle (see `triton_eligible`) run the reference.
    """
    _check_args(x, weight)
    if use_triton(x, weight, backend=backend) and triton_eligible(x, weight):
        y, _rstd = rms_norm_fwd(x, weight, eps)
        return y
    return rms_norm_ref(x, weight, eps)
