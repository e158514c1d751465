"""Cross-entropy over a vocabulary, with ignore_index and an optional z-loss.

Shapes: logits (N, V) in fp32/bf16/fp16, labels (N,) int64 (or int32) with values in [0, V) or
ignore_index.

Forward, per row i with label y_i != ignore_index (fp32 math):
    lse_i  = log sum_v exp(x_iv)
    loss_i = lse_i - x_{i,y_i} + z_loss * lse_i^2
Rows whose label is ignore_index have loss 0. reduction: "none" -> (N,) fp32 per-row losses;
"sum" -> scalar; "mean" -> sum / max(#non-ignored, 1) (an all-ignored batch gives 0, never NaN;
the count stays on the device, so there is no host sync).
Backward, with s_i = dL/dloss_i (1 for "sum", 1/count for "mean", the caller's for "none"):
    dL/dx_iv = s_i * (softmax(x_i)_v * (1 + 2 z_loss lse_i) - [v == y_i])
and zero for ignored rows.

Triton path (this file, top to bottom: reference, kernels, launchers, torch.library ops, public
function):
- forward (octo::cross_entropy_fwd): a program takes ROWS rows (1 for a large vocabulary, more
  for a small one) and walks the vocabulary in BLOCK_V column blocks with an online softmax
  (running max m and running sum d of exp(x - m)), so any V (256k and beyond) streams through
  registers; it reads x once (ignored rows not at all) and writes loss_i and the row's softmax
  statistics (m_i, log d_i) (fp32, (N, 2)). Row offsets are int64 (N * V may pass 2^31); the
  reduction over rows is plain torch on (N,) fp32.
- the blocks start at 16-byte boundaries of memory, not at the row's first column: with V = 50257
  in bf16 a row starts anywhere, and blocks from the row start compiled to 16-bit loads and
  stores (bench/kernel_asm.py, sm_90: 16 per thread per block, and 64 registers instead of 32);
  aligned, every block access is a 16-byte vector. The < 16 bytes before the first boundary and
  after the last are read (and written) as two small masked tiles.
- why (m, log d) and not lse = m + log d: a confident row has lse ~ 20, whose fp32 spacing is
  2e-6, while its true-class gradient p_y - 1 and its loss are ~1e-6; exp(x - lse) and lse - x_y
  would carry that rounding (27% off at p_y = 1 - 4e-6). (x - m) - log d and (m - x_y) + log d
  are exact where x = m, as PyTorch's log_softmax is.
- backward (octo::cross_entropy_bwd): the same tiling re-reads x, rebuilds
  softmax = exp((x - m) - log d) from the saved statistics, and writes dL/dx once, in x's
  dtype, scaled in the kernel by s_i read through a stride (stride 0 for the expanded gradient
  of "sum"/"mean": no copy, no host sync). The true-class term p - 1 is formed in fp32 before
  the cast.
  Why recompute instead of writing the gradient during the forward (as Liger does): per logit
  this moves 3 passes (forward read; backward read + write). A forward-written gradient costs a
  forward read, re-read and write, then a backward read + write to apply dL/dloss (or a host sync
  to skip it when that is 1), and keeps logits and gradient alive together from forward to
  backward; writing it in place over the logits corrupts any other user of those logits.
- the same forward kernel, with HAS_GRAD, also writes the gradient of a row right after its
  loss; octo_kernels/linear_cross_entropy.py uses that on its own per-chunk logits buffer (in place:
  each element is read before it is overwritten, and the buffer has no other user).
Labels outside [0, V) other than ignore_index: the reference raises (one host sync); the Triton
path does not sync to check and gives that row a NaN loss and a NaN gradient row instead (never
an out-of-bounds read), so a NaN-checking trainer stops on it.
Eligible for Triton: logits fp32/bf16/fp16 with N > 0 and V > 0. Else the reference runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from octo_kernels.backend import interpreting, triton_available, use_triton

REDUCTIONS = ("mean", "sum", "none")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TILE_ELEMENTS_GPU = 8192  # elements of a (ROWS, BLOCK_V) tile; see _tiles
TILE_ELEMENTS_INTERPRETED = 65536


def check_cross_entropy_args(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, reduction: str
) -> None:
    """Shape/dtype/device checks shared by every path (no host sync): one line naming the fix."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"cross_entropy: reduction {reduction!r} not in {REDUCTIONS}")
    if logits.dim() != 2:
        raise ValueError(f"cross_entropy: logits must be (N, V), got {tuple(logits.shape)}")
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"cross_entropy: labels {tuple(labels.shape)} must be ({logits.shape[0]},) to match "
            f"logits {tuple(logits.shape)}"
        )
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"cross_entropy: labels must be int64 or int32, got {labels.dtype}")
    if not logits.is_floating_point():
        raise ValueError(f"cross_entropy: logits must be floating point, got {logits.dtype}")
    if logits.device != labels.device:
        raise ValueError(
            f"cross_entropy: logits on {logits.device} but labels on {labels.device}; move both"
        )


def check_label_range(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Labels outside [0, V) other than ignore_index: a clear error. Costs one host sync, so only
    the reference path calls it (the Triton kernels give such a row a NaN loss instead)."""
    if torch.compiler.is_compiling():  # a compiled graph cannot branch on data: eager checks
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        first = int(labels[bad][0])
        raise ValueError(
            f"cross_entropy: label {first} is outside the vocabulary [0, {vocab_size}) and is not "
            f"ignore_index={ignore_index}; check the tokenizer's vocab size against the model's"
        )


def reduce_losses(per_row: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """(N,) per-row losses (0 where ignored) -> the reduction, mean over valid rows (no sync)."""
    if reduction == "none":
        return per_row
    total = per_row.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp(min=1).to(total.dtype)


def cross_entropy_ref(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    z_loss: float = 0.0,
) -> torch.Tensor:
    """Reference cross-entropy. logits (N, V), labels (N,) -> fp32 loss per `reduction`.

    The math runs in fp32 (fp64 logits stay fp64, so tests can measure fp32 against fp64)."""
    check_cross_entropy_args(logits, labels, ignore_index, reduction)
    check_label_range(labels, logits.shape[1], ignore_index)
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    valid = labels != ignore_index
    if not z_loss:
        # lse - x[label] as ATen's fused log_softmax + nll (0 where ignored): on a CPU, forward
        # plus backward take ~1/3 of the time of logsumexp - gather below, which made Octo's CPU
        # training step slower than transformers' (bench/test_bench_model.py).
        per_row = F.cross_entropy(x, labels.long(), ignore_index=ignore_index, reduction="none")
        return reduce_losses(per_row, valid, reduction)
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    lse = torch.logsumexp(x, dim=-1)  # (N,)
    target = x.gather(1, safe.unsqueeze(1)).squeeze(1)  # (N,)
    per_row = lse - target + z_loss * lse.square()
    per_row = torch.where(valid, per_row, torch.zeros_like(per_row))
    return reduce_losses(per_row, valid, reduction)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    from octo_kernels.backend import cast_like

    LOG2E = tl.constexpr(1.4426950408889634)

    @triton.jit
    def _row_spans(rows, stride_x, V, ALIGN: tl.constexpr):
        """Where each row's V logits lie, as flat element offsets from X (int64, (ROWS,) each):
        the row starts at base and ends at end; [lo, hi) is its 16-byte-aligned body (lo, hi
        multiples of ALIGN = 16 bytes / element size; hi < lo for a row inside one 16 bytes).

        Why: with V (or the row stride) not a multiple of ALIGN, say V = 50257 in bf16, rows start
        at arbitrary 2-byte addresses and a column-block walk from the row start compiles to
        16-bit loads and stores (bench/kernel_asm.py: 16 per thread per block, and twice the
        registers). Walking the body from an aligned lo instead lets every body access be one
        16-byte vector; the < ALIGN elements before lo and after hi go through small masked
        tiles."""
        base = rows * stride_x
        end = base + V
        lo = (base + ALIGN - 1) // ALIGN * ALIGN
        hi = end // ALIGN * ALIGN
        return base, end, lo, hi

    @triton.jit
    def _ragged_ends(base, end, lo, hi, ALIGN: tl.constexpr):
        """Flat offsets and masks of the (ROWS, ALIGN) head [base, lo) and tail [max(lo, hi), end)
        of each row (together all of its elements outside [lo, hi))."""
        e = tl.arange(0, ALIGN)
        head = base[:, None] + e[None, :]
        head_in = (head < lo[:, None]) & (head < end[:, None])
        tail = tl.maximum(lo, hi)[:, None] + e[None, :]
        tail_in = tail < end[:, None]
        return head, head_in, tail, tail_in

    @triton.jit
    def _ce_grad_at(
        X, G, offs, in_row, g_shift, col, col_y, m, logd, coef, scale, active, row_ok
    ):  # fmt: skip
        """G = scale * (exp((x - m) - log d) * (1 + 2 z lse) - [col == col_y]) at flat offsets
        offs (ROWS, K) where in_row, fp32 math (p from (x - m) - log d is exact at the row max,
        see the module docstring); inactive rows get zeros. col / col_y (int32): the columns'
        and the label's positions from one origin per row (an int32 compare: an int64 one would
        hold two registers per element). G's element sits at X's offset plus g_shift per row (0
        in place): a shift divisible by 16 keeps G's stores aligned too."""
        x = tl.load(X + offs, mask=active[:, None] & in_row, other=0.0)
        t = (x.to(tl.float32) - m[:, None]) - logd[:, None]  # log p, exact where x == m
        p = tl.exp2(t * LOG2E) * coef[:, None]
        g = tl.where(col == col_y[:, None], p - 1.0, p) * scale[:, None]  # p - 1: fp32
        g = tl.where(active[:, None], g, 0.0)
        tl.store(G + (offs + g_shift[:, None]), cast_like(g, G), mask=row_ok[:, None] & in_row)

    @triton.jit
    def _ce_grad_rows(
        X, G, rows, stride_x, g_shift, V, y, m, logd, scale, z_loss, active, row_ok,
        BLOCK_V: tl.constexpr, ALIGN: tl.constexpr,
    ):  # fmt: skip
        """dL/dx of whole rows (see _ce_grad_at): the ragged ends, then the aligned body in
        BLOCK_V column blocks. y (ROWS,) int64 labels, m / logd the saved statistics, scale
        dL/dloss per row (NaN for an out-of-vocabulary label)."""
        base, end, lo, hi = _row_spans(rows, stride_x, V, ALIGN)
        head, head_in, tail, tail_in = _ragged_ends(base, end, lo, hi, ALIGN)
        coef = 1.0 + 2.0 * z_loss * (m + logd)
        e = tl.arange(0, ALIGN)[None, :]
        y_at = base + y  # the label's flat offset, then relative to each piece's first column
        _ce_grad_at(
            X, G, head, head_in, g_shift, e, y.to(tl.int32), m, logd, coef, scale, active, row_ok
        )  # fmt: skip
        tail_y = (y_at - tl.maximum(lo, hi)).to(tl.int32)
        _ce_grad_at(X, G, tail, tail_in, g_shift, e, tail_y, m, logd, coef, scale, active, row_ok)
        body_y = (y_at - lo).to(tl.int32)
        cols = tl.arange(0, BLOCK_V)
        for start in range(0, V, BLOCK_V):
            offs = lo[:, None] + start + cols[None, :]
            body_in = offs < hi[:, None]
            _ce_grad_at(
                X, G, offs, body_in, g_shift, start + cols[None, :], body_y, m, logd, coef,
                scale, active, row_ok,
            )  # fmt: skip

    @triton.jit
    def _online_max_sum(m, d, x):
        """Fold a (ROWS, K) fp32 block x into the running row max m and sum d of exp(x - m)."""
        m_new = tl.maximum(m, tl.max(x, axis=1))
        m_safe = tl.where(m_new > -float("inf"), m_new, 0.0)  # no -inf - -inf = NaN below
        d = d * tl.exp2((m - m_safe) * LOG2E) + tl.sum(tl.exp2((x - m_safe[:, None]) * LOG2E), 1)
        return m_new, d

    @triton.jit
    def _ce_fwd_kernel(
        X,  # (N, V) logits, row stride stride_x, column stride 1
        LABELS,  # (N,) int64/int32, contiguous
        LOSS,  # (N,) fp32 out: per-row loss, 0 where ignored
        STATS,  # (N, 2) fp32 out: row max m and log d (lse = m + log d), 0 where ignored
        SCALE,  # HAS_GRAD: fp32 dL/dloss per row, read at row * stride_s (stride 0: one scalar)
        n_rows,
        stride_x,
        stride_s,
        V,
        ignore_index,
        z_loss,
        HAS_GRAD: tl.constexpr,  # also overwrite X in place with dL/dx, row by row
        BLOCK_V: tl.constexpr,
        ROWS: tl.constexpr,
        ALIGN: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # (ROWS,) int64
        row_ok = rows < n_rows
        y = tl.load(LABELS + rows, mask=row_ok, other=ignore_index).to(tl.int64)
        active = row_ok & (y != ignore_index)  # ignored rows are never read

        # online softmax over the row: m = running max, d = sum exp(x - m), per row; first the
        # ragged ends, then the 16-byte-aligned body in column blocks (see _row_spans)
        base, end, lo, hi = _row_spans(rows, stride_x, V, ALIGN)
        head, head_in, tail, tail_in = _ragged_ends(base, end, lo, hi, ALIGN)
        ends = tl.join(
            tl.load(X + head, mask=active[:, None] & head_in, other=-float("inf")),
            tl.load(X + tail, mask=active[:, None] & tail_in, other=-float("inf")),
        )  # (ROWS, ALIGN, 2)
        m, d = _online_max_sum(
            tl.full((ROWS,), -float("inf"), tl.float32), tl.zeros((ROWS,), tl.float32),
            tl.reshape(ends, (ROWS, 2 * ALIGN)).to(tl.float32),
        )  # fmt: skip
        cols = tl.arange(0, BLOCK_V)
        for start in range(0, V, BLOCK_V):
            offs = lo[:, None] + start + cols[None, :]
            mask = active[:, None] & (offs < hi[:, None])
            xb = tl.load(X + offs, mask=mask, other=-float("inf"))
            m, d = _online_max_sum(m, d, xb.to(tl.float32))
        m = tl.where(active, m, 0.0)
        logd = tl.where(active, tl.log(tl.where(active, d, 1.0)), 0.0)
        lse = m + logd

        in_vocab = (y >= 0) & (y < V)
        x_y = tl.load(X + base + y, mask=active & in_vocab, other=0.0).to(tl.float32)
        loss = tl.where(in_vocab, (m - x_y) + logd + z_loss * lse * lse, float("nan"))
        tl.store(LOSS + rows, tl.where(active, loss, 0.0), mask=row_ok)
        tl.store(STATS + 2 * rows, m, mask=row_ok)
        tl.store(STATS + 2 * rows + 1, logd, mask=row_ok)
        if HAS_GRAD:
            scale = tl.load(SCALE + rows * stride_s, mask=row_ok, other=0.0).to(tl.float32)
            scale = tl.where(in_vocab, scale, float("nan"))
            in_place = tl.zeros((ROWS,), tl.int64)
            _ce_grad_rows(
                X, X, rows, stride_x, in_place, V, y, m, logd, scale, z_loss, active, row_ok,
                BLOCK_V, ALIGN,
            )  # fmt: skip

    @triton.jit
    def _ce_bwd_kernel(
        X,  # (N, V) logits, row stride stride_x, column stride 1
        LABELS,  # (N,) int64/int32, contiguous
        STATS,  # (N, 2) fp32 from the forward: m, log d
        DLOSS,  # fp32 dL/dloss per row, read at row * stride_s (stride 0: expanded scalar)
        G,  # (N, V) out, row stride stride_x + g_row_shift
        n_rows,
        stride_x,
        g_row_shift,  # G's row stride minus X's (0 when both are (N, V) contiguous)
        stride_s,
        V,
        ignore_index,
        z_loss,
        BLOCK_V: tl.constexpr,
        ROWS: tl.constexpr,
        ALIGN: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # (ROWS,) int64
        row_ok = rows < n_rows
        y = tl.load(LABELS + rows, mask=row_ok, other=ignore_index).to(tl.int64)
        active = row_ok & (y != ignore_index)
        m = tl.load(STATS + 2 * rows, mask=active, other=0.0)
        logd = tl.load(STATS + 2 * rows + 1, mask=active, other=0.0)
        scale = tl.load(DLOSS + rows * stride_s, mask=active, other=0.0).to(tl.float32)
        scale = tl.where((y >= 0) & (y < V), scale, float("nan"))
        _ce_grad_rows(
            X, G, rows, stride_x, rows * g_row_shift, V, y, m, logd, scale, z_loss, active,
            row_ok, BLOCK_V, ALIGN,
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Launchers (real tensors only; shapes already checked)
# ----------------------------------------------------------------------------------------------


def _tiles(n_rows: int, vocab: int) -> tuple[int, int, int]:
    """(BLOCK_V, ROWS, num_warps). A program streams ROWS rows through (ROWS, BLOCK_V) tiles of
    ~8K elements on a GPU (16 per thread: enough bytes in flight per SM; chosen, not yet tuned),
    so large vocabularies get one row per program and small ones several; under the interpreter
    tiles of ~64K elements (fewer, slower Python steps)."""
    target = TILE_ELEMENTS_INTERPRETED if interpreting() else TILE_ELEMENTS_GPU
    block = min(triton.next_power_of_2(vocab), target)
    rows = min(max(1, target // block), triton.next_power_of_2(n_rows), 64)
    return block, rows, max(4, min(16, rows * block // 512))


def _cols_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernels take a row stride and need column stride 1; copy only when that fails."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _align(t: torch.Tensor) -> int:
    """Elements per 16 bytes of t's dtype: the kernels' aligned body starts on such a boundary."""
    return 16 // t.element_size()


def ce_forward_launch(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    z_loss: float,
    grad_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss (N,) fp32 and softmax statistics (N, 2) fp32 (row max m, log d; see the
    module docstring) of logits (N, V) (column stride 1).

    With `grad_scale` (fp32 dL/dloss, (N,) of any stride, or one element for every row), the
    kernel also overwrites `logits` in place with dL/dlogits = scale_i * (softmax - onehot), each
    row right after its loss (the linear cross-entropy's per-chunk buffer, which has no other
    user).
    """
    n_rows, vocab = logits.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    stats = torch.empty((n_rows, 2), dtype=torch.float32, device=logits.device)
    has_grad = grad_scale is not None
    scale = grad_scale if has_grad else loss  # unused by the kernel without HAS_GRAD
    stride_s = scale.stride(0) if has_grad and scale.numel() > 1 else 0
    block, rows, num_warps = _tiles(n_rows, vocab)
    _ce_fwd_kernel[(triton.cdiv(n_rows, rows),)](
        logits, labels.contiguous(), loss, stats, scale,
        n_rows, logits.stride(0), stride_s, vocab, ignore_index, z_loss,
        HAS_GRAD=has_grad, BLOCK_V=block, ROWS=rows, ALIGN=_align(logits), num_warps=num_warps,
    )  # fmt: skip
    return loss, stats


def _bwd_launch(logits, labels, stats, dloss, ignore_index, z_loss):
    logits = _cols_contiguous(logits)
    n_rows, vocab = logits.shape
    grad = torch.empty((n_rows, vocab), dtype=logits.dtype, device=logits.device)
    dloss = dloss.float()  # a no-op for the fp32 loss gradient; keeps an expanded stride 0
    block, rows, num_warps = _tiles(n_rows, vocab)
    _ce_bwd_kernel[(triton.cdiv(n_rows, rows),)](
        logits, labels.contiguous(), stats.contiguous(), dloss, grad,
        n_rows, logits.stride(0), grad.stride(0) - logits.stride(0), dloss.stride(0), vocab,
        ignore_index, z_loss,
        BLOCK_V=block, ROWS=rows, ALIGN=_align(logits), num_warps=num_warps,
    )  # fmt: skip
    return grad


# ----------------------------------------------------------------------------------------------
# torch.library ops: opaque to torch.compile (fake impls give shapes), differentiable
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("octo::cross_entropy_fwd", mutates_args=())
def cross_entropy_fwd(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, z_loss: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (N, V), labels (N,) -> per-row loss (N,) fp32 (0 where ignored), softmax
    statistics (N, 2) fp32 (row max, log-normaliser) for the backward."""
    return ce_forward_launch(_cols_contiguous(logits), labels, ignore_index, z_loss)


@cross_entropy_fwd.register_fake
def _(logits, labels, ignore_index, z_loss):
    n_rows = logits.shape[0]
    return (
        logits.new_empty(n_rows, dtype=torch.float32),
        logits.new_empty((n_rows, 2), dtype=torch.float32),
    )


@torch.library.custom_op("octo::cross_entropy_bwd", mutates_args=())
def cross_entropy_bwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    stats: torch.Tensor,
    dloss: torch.Tensor,
    ignore_index: int,
    z_loss: float,
) -> torch.Tensor:
    """dL/dlogits (N, V) in logits' dtype, from dloss (N,) = dL/dloss_i (any stride, also 0)."""
    return _bwd_launch(logits, labels, stats, dloss, ignore_index, z_loss)


@cross_entropy_bwd.register_fake
def _(logits, labels, stats, dloss, ignore_index, z_loss):
    return logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output):
    logits, labels, ignore_index, z_loss = inputs
    _loss, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(logits, labels, stats)
    ctx.ignore_index, ctx.z_loss = ignore_index, z_loss


def _backward(ctx, dloss, _dstats):
    logits, labels, stats = ctx.saved_tensors
    if dloss is None or not ctx.needs_input_grad[0]:
        return None, None, None, None
    grad = cross_entropy_bwd(logits, labels, stats, dloss, ctx.ignore_index, ctx.z_loss)
    return grad, None, None, None


cross_entropy_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------


def triton_eligible(logits: torch.Tensor) -> bool:
    """True when the fused kernels handle these logits (else the reference runs)."""
    return triton_available() and logits.dtype in KERNEL_DTYPES and logits.numel() > 0


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    z_loss: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Cross-entropy of logits (N, V) against labels (N,); fp32 result. See module docstring.

    reduction "mean" (over non-ignored rows) | "sum" -> scalar, "none" -> (N,). backend: None
    (OCTO_KERNELS), "auto", "triton" or "torch"; see octo_kernels.backend. On the Triton path a
    label outside [0, V) other than ignore_index gives a NaN loss instead of an error (no host
    sync).
    """
    check_cross_entropy_args(logits, labels, ignore_index, reduction)
    if use_triton(logits, labels, backend=backend) and triton_eligible(logits):
        per_row, _stats = cross_entropy_fwd(logits, labels, int(ignore_index), float(z_loss))
        return reduce_losses(per_row, labels != ignore_index, reduction)
    return cross_entropy_ref(logits, labels, ignore_index, reduction, z_loss)
