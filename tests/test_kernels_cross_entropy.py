"""Triton cross-entropy (octo_kernels/cross_entropy.py) against its reference: loss and gradient.

On a machine without a GPU the Triton kernels run on CPU tensors through the interpreter
(backend="triton"; tests/conftest.py sets TRITON_INTERPRET=1), which proves the math. Tolerances
follow tests/numerics.py: the error against the reference on upcast inputs is at most 2x the error
of the reference run on the kernel's dtype, plus a small atol. Both the kernel and the reference do
their math in fp32 whatever the input dtype, so the inputs are upcast to fp64: measured against
fp32 math, the baseline would have zero error and any fp32 reordering would fail.
"""

from __future__ import annotations

import functools
import sys

import pytest
import torch

import octo_kernels
from octo_kernels import cross_entropy, cross_entropy_ref
from octo_kernels.backend import interpreting
from tests.numerics import FAR_STRIDE, assert_kernel_close, far_view

ce_mod = sys.modules["octo_kernels.cross_entropy"]
triton_ce = functools.partial(cross_entropy, backend="triton")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _loss_and_grad(fn, logits, labels, reduction="mean", z_loss=0.0, upstream=None):
    """loss and dL/dlogits of sum(upstream * loss); upstream defaults to 1.7 (or random per row
    for "none"), so the backward's scaling by dL/dloss is exercised, not only dL/dloss = 1."""
    x = logits.detach().requires_grad_(True)
    loss = fn(x, labels, reduction=reduction, z_loss=z_loss)
    if upstream is None:
        upstream = torch.full((), 1.7) if reduction != "none" else torch.rand(labels.shape[0])
    (grad,) = torch.autograd.grad((loss * upstream).sum(), x)
    return loss.detach(), grad, upstream


def check_against_reference(logits, labels, reduction="mean", z_loss=0.0):
    """Triton loss and gradient vs the reference on upcast inputs, with the tolerance rule."""
    out, grad, up = _loss_and_grad(triton_ce, logits, labels, reduction, z_loss)
    ref, ref_grad, _ = _loss_and_grad(
        cross_entropy_ref, logits.double(), labels, reduction, z_loss, up
    )
    base, base_grad, _ = _loss_and_grad(cross_entropy_ref, logits, labels, reduction, z_loss, up)
    assert out.dtype == torch.float32 and grad.dtype == logits.dtype
    assert grad.shape == logits.shape
    assert_kernel_close(out, ref, base, name=f"loss ({reduction})")
    assert_kernel_close(grad, ref_grad, base_grad, name=f"dlogits ({reduction})", elementwise=True)


def _labels(n: int, vocab: int, ignore_every: int = 5, dtype=torch.int64) -> torch.Tensor:
    labels = torch.randint(0, vocab, (n,), dtype=dtype)
    labels[::ignore_every] = -100
    if n > 1:
        labels[1] = vocab - 1  # the last column, at a block edge for most BLOCK_V
    return labels


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_rows,vocab", [(1, 777), (199, 777), (3, 50257)])
def test_matches_reference(dtype, n_rows, vocab):
    # 777 is not a power of two; 50257 (GPT-2) spans several column blocks on a GPU
    logits = (torch.randn(n_rows, vocab) * 3).to(dtype)
    labels = _labels(n_rows, vocab)
    check_against_reference(logits, labels, "sum" if n_rows == 1 else "mean")


def test_vocab_256k():
    logits = (torch.randn(3, 262144) * 3).to(torch.bfloat16)  # 4 column blocks interpreted
    check_against_reference(logits, _labels(3, 262144, ignore_every=2), "mean", z_loss=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("vocab", [1, 3, 9, 37])
def test_rows_off_16_byte_boundaries(dtype, vocab, monkeypatch):
    """The kernels walk each row's 16-byte-aligned body in vectors and the elements before and
    after it (fewer than 16 bytes each) as ragged ends. With V not a multiple of 16 bytes, row r
    starts at byte r * V * size, so over 19 rows every offset from a boundary occurs, rows that
    lie inside one 16-byte span included (V = 1, 3). Labels sit on each row's first and last
    column and on the columns next to a boundary; blocks of 16 columns give several body blocks.
    The forward that writes the gradient in place (the linear cross-entropy's) is checked
    against the plain backward."""
    monkeypatch.setattr(ce_mod, "TILE_ELEMENTS_INTERPRETED", 16)
    n_rows = 19
    logits = (torch.randn(n_rows, vocab) * 3).to(dtype)
    align = 16 // logits.element_size()
    cols = torch.arange(n_rows)
    starts = cols * vocab  # flat offset of each row
    first_boundary = (starts + align - 1) // align * align - starts  # column of lo
    labels = torch.stack([cols * 0, cols * 0 + vocab - 1, first_boundary, first_boundary - 1])
    labels = labels.clamp(0, vocab - 1)[cols % 4, cols]
    labels[5] = -100
    check_against_reference(logits, labels, "none", z_loss=1e-3)
    check_against_reference(logits, labels, "mean")
    _, want, _ = _loss_and_grad(triton_ce, logits, labels, "sum", upstream=torch.ones(()))
    in_place = logits.clone()
    loss, _ = ce_mod.ce_forward_launch(in_place, labels, -100, 0.0, grad_scale=torch.ones(1))
    torch.testing.assert_close(loss.sum(), triton_ce(logits, labels, reduction="sum"))
    torch.testing.assert_close(in_place, want, rtol=0, atol=0)


@pytest.mark.parametrize("tile", [256, 8192])
def test_online_softmax_over_column_blocks(monkeypatch, tile):
    """Tiles as small as a GPU's relative to V: 777 columns in 256-wide blocks (the online
    softmax rescales its running sum across blocks, one row per program), or the GPU's tiles of
    8 rows of one 1024-wide block per program; the interpreter otherwise takes whole rows."""
    monkeypatch.setattr(ce_mod, "TILE_ELEMENTS_INTERPRETED", tile)
    block, rows, _ = ce_mod._tiles(37, 777)
    assert (block, rows) == ((256, 1) if tile == 256 else (1024, 8))
    logits = (torch.randn(37, 777) * 3).to(torch.bfloat16)
    logits[3, 700] = 30.0  # the row max in the last block: earlier blocks' sums get rescaled
    labels = _labels(37, 777)
    check_against_reference(logits, labels, "none", z_loss=1e-3)
    check_against_reference(logits.float(), labels, "mean")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_with_z_loss(dtype, reduction):
    logits = (torch.randn(37, 513) * 2).to(dtype)
    check_against_reference(logits, _labels(37, 513, ignore_every=4), reduction, z_loss=1e-3)


def test_int32_labels():
    logits = torch.randn(11, 300)
    check_against_reference(logits, _labels(11, 300, dtype=torch.int32), "mean", z_loss=1e-4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["row_slice", "transposed"])
def test_non_contiguous_logits(layout, dtype):
    vocab = 301
    # built in the dtype, then viewed: .to(dtype) of a row slice would return a contiguous copy
    if layout == "row_slice":  # row stride 310 != V: read through the stride, no copy
        logits = torch.randn(23, vocab + 9).to(dtype)[:, :vocab]
    else:  # column stride != 1: the op copies
        logits = torch.randn(vocab, 23).to(dtype).t()
    assert not logits.is_contiguous()
    check_against_reference(logits, _labels(23, vocab), "mean")
    check_against_reference(logits, _labels(23, vocab), "none", z_loss=1e-4)


@pytest.mark.parametrize("tile", [256, None], ids=["blocks_of_256", "whole_rows"])
def test_large_magnitude_fp32(monkeypatch, tile):
    # online softmax must subtract the running max: exp(1e4) overflows fp32; in 256-wide blocks
    # the running max jumps by ~1e4 between blocks and the sums so far are rescaled by exp(-1e4)
    if tile is not None:
        monkeypatch.setattr(ce_mod, "TILE_ELEMENTS_INTERPRETED", tile)
    logits = torch.randn(17, 1000) * 1e4
    check_against_reference(logits, _labels(17, 1000), "mean")
    check_against_reference(logits, _labels(17, 1000), "none", z_loss=1e-4)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_ignored_gives_zero_loss_and_gradient(dtype, backend):
    logits = torch.randn(6, 130, dtype=dtype)
    labels = torch.full((6,), -100)
    for reduction in ("mean", "sum", "none"):
        fn = functools.partial(cross_entropy, backend=backend)
        loss, grad, _ = _loss_and_grad(fn, logits, labels, reduction, z_loss=1e-3)
        assert torch.isfinite(loss).all() and torch.isfinite(grad.float()).all(), reduction
        assert (loss == 0).all() and (grad == 0).all(), reduction
        assert loss.shape == ((6,) if reduction == "none" else ()), reduction


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_true_class_gradient_in_fp32(dtype):
    """Rows whose label holds almost all the probability: dL/dx_y = p_y - 1 is then small and
    must be formed in fp32 before the cast. With p_y rounded to bf16 first (spacing 2^-8 below
    1), p_y = 0.991 gives an error of up to 0.002 on -0.009, and p_y = 1 - 1e-4 gives 0: this test
    fails then (checked on such a variant of the kernel). Margins stop at 16: beyond, fp32 itself
    cannot hold 1 - p_y (spacing 6e-8 below 1)."""
    vocab = 777
    margins = torch.tensor([0.0, 4.0, 8.0, 12.0, 16.0])  # p_y from 1/V to 1 - 9e-5
    logits = 0.5 * torch.randn(len(margins), vocab)
    labels = torch.randint(0, vocab, (len(margins),))
    logits[torch.arange(len(margins)), labels] += margins
    check_against_reference(logits.to(dtype), labels, "mean")
    check_against_reference(logits.to(dtype), labels, "none", z_loss=1e-4)


@pytest.mark.parametrize("path", ["cross_entropy", "linear_cross_entropy"])
def test_confident_rows_keep_fp32_precision_near_one(path):
    """fp32 rows whose label holds all but ~1e-3 .. 1e-7 of the probability, shifted by +30 (the
    softmax does not change; lse becomes ~40, whose fp32 spacing is 3.8e-6). Their loss (~1e-6)
    and true-class gradient p_y - 1 are formed from O(1) quantities, so fp32 can give them to a
    few units of its precision at 1 (eps = 1.2e-7); a kernel that goes through lse itself
    (exp(x - lse), lse - x_y) is off by up to half of lse's spacing, 16 eps. Both the plain
    backward kernel and the forward-with-gradient one (linear CE, here with an identity weight,
    so its logits are the inputs exactly) are checked, against fp64."""
    vocab, eps = 777, torch.finfo(torch.float32).eps
    margins = torch.tensor([14.0, 16.0, 18.0, 20.0, 22.0])
    logits = 0.5 * torch.randn(len(margins), vocab)
    labels = torch.randint(0, vocab, (len(margins),))
    logits[torch.arange(len(margins)), labels] += margins
    logits += 30.0
    ones = torch.ones(len(margins))
    if path == "cross_entropy":
        loss, grad, _ = _loss_and_grad(triton_ce, logits, labels, "none", upstream=ones)
    else:
        eye = torch.eye(vocab)
        loss, grad, _ = _loss_and_grad(
            lambda x, y, **kw: octo_kernels.linear_cross_entropy(x, eye, y, backend="triton", **kw),
            logits, labels, "none", upstream=ones,
        )  # fmt: skip
    ref, ref_grad, _ = _loss_and_grad(
        cross_entropy_ref, logits.double(), labels, "none", upstream=ones.double()
    )
    assert (ref < 1e-3).all() and (ref > 1e-7).all()  # the rows are as confident as intended
    assert (loss.double() - ref).abs().max().item() <= 4 * eps
    assert (grad.double() - ref_grad).abs().max().item() <= 4 * eps


def test_custom_ignore_index():
    logits = torch.randn(9, 64)
    labels = torch.randint(0, 64, (9,))
    labels[::3] = 7  # a real class id used as ignore_index
    out, grad, _ = _loss_and_grad(
        functools.partial(triton_ce, ignore_index=7), logits, labels, "mean"
    )
    ref, ref_grad, _ = _loss_and_grad(
        functools.partial(cross_entropy_ref, ignore_index=7), logits, labels, "mean"
    )
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-6)
    assert (grad[::3] == 0).all()


def test_label_outside_vocab_is_nan_on_triton_and_raises_on_reference():
    logits = torch.randn(4, 50)
    labels = torch.tensor([3, 50, -100, -1])  # 50 == V and -1 (not ignore_index) are outside
    with pytest.raises(ValueError, match="outside the vocabulary"):
        cross_entropy_ref(logits, labels)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        cross_entropy(logits, labels, backend="torch")
    loss, grad, _ = _loss_and_grad(triton_ce, logits, labels, "none")
    assert torch.isfinite(loss[[0, 2]]).all() and loss[[1, 3]].isnan().all()
    assert torch.isfinite(grad[[0, 2]]).all() and grad[[1, 3]].isnan().all()
    assert loss[2] == 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_input_raises_one_clear_line(backend):
    logits, labels = torch.randn(4, 10), torch.randint(0, 10, (4,))
    cases = [
        ((logits, labels[:3]), "labels"),  # mismatched rows
        ((logits[0], labels), "logits must be \\(N, V\\)"),  # wrong rank
        ((logits, labels.float()), "int64 or int32"),  # label dtype
        ((logits.long(), labels), "floating point"),  # logits dtype
        ((logits, labels.to("meta")), "move both"),  # devices
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            cross_entropy(*args, backend=backend)
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(logits, labels, reduction="avg", backend=backend)


def test_public_function_dispatch():
    logits = torch.randn(3, 20, dtype=torch.float64, requires_grad=True)  # not a kernel dtype
    labels = torch.randint(0, 20, (3,))
    out = cross_entropy(logits, labels, reduction="none", backend="triton")
    assert "octo" not in type(out.grad_fn).__name__  # the reference ran, in fp64
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, cross_entropy_ref(logits, labels, reduction="none"))
    fp32 = cross_entropy(logits.float(), labels, reduction="none", backend="triton")
    assert "octo_cross_entropy_fwd" in type(fp32.grad_fn).__name__
    assert octo_kernels.cross_entropy is cross_entropy
    assert not ce_mod.triton_eligible(torch.randn(0, 20))


def test_opcheck():
    logits = torch.randn(5, 70, requires_grad=True)
    labels = _labels(5, 70, ignore_every=2)
    torch.library.opcheck(ce_mod.cross_entropy_fwd, (logits, labels, -100, 1e-3))
    _, stats = ce_mod.cross_entropy_fwd(logits.detach(), labels, -100, 0.0)  # (5, 2): m, log d
    dloss = torch.ones(1).expand(5)  # the stride-0 gradient of a sum
    torch.library.opcheck(
        ce_mod.cross_entropy_bwd, (logits.detach(), labels, stats, dloss, -100, 0.0)
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_compile_fullgraph_matches_eager(reduction):
    # compiled graphs may hand the backward an expanded stride-0 dL/dloss (grad of a .sum());
    # the kernel reads it through its stride, so compiled and eager must agree exactly
    logits = torch.randn(13, 257, dtype=torch.bfloat16)
    labels = _labels(13, 257, ignore_every=3)

    def step(x, y):
        loss = triton_ce(x, y, reduction=reduction, z_loss=1e-3)
        return loss.sum() if reduction == "none" else loss

    x_eager = logits.clone().requires_grad_(True)
    step(x_eager, labels).backward()
    x_comp = logits.clone().requires_grad_(True)
    loss_comp = torch.compile(step, fullgraph=True)(x_comp, labels)
    loss_comp.backward()
    torch.testing.assert_close(loss_comp, step(logits, labels), rtol=0, atol=1e-5)
    torch.testing.assert_close(x_comp.grad, x_eager.grad, rtol=0, atol=0)


@pytest.mark.skipif(not interpreting(), reason="CPU interpreter only; see test_gpu_int64_offsets")
def test_int64_offsets_past_2_pow_31(tmp_path):
    """Rows 2^30 + 64 elements apart (a sparse file behind them, no 4 GiB): row 2 starts past
    2^31, where an int32 offset wraps. Forward, backward, and the forward that writes the
    gradient in place (the linear cross-entropy's path) read and write through the int64 rows."""
    vocab = 1000
    logits = far_view(tmp_path, (3, vocab), (FAR_STRIDE, 1), torch.bfloat16)
    logits.copy_((3 * torch.randn(3, vocab)).to(torch.bfloat16))
    labels = torch.tensor([5, vocab - 1, 17])
    check_against_reference(logits, labels, "none", z_loss=1e-4)
    # in place, as octo_kernels/linear_cross_entropy.py does: the gradient overwrites the logits
    want = logits.clone()  # (3, V) contiguous
    want_loss, _ = ce_mod.ce_forward_launch(want, labels, -100, 0.0, grad_scale=torch.ones(1))
    loss, _ = ce_mod.ce_forward_launch(logits, labels, -100, 0.0, grad_scale=torch.ones(1))
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=0)
    torch.testing.assert_close(logits, want, rtol=0, atol=0)
    assert want.abs().sum() > 0


@pytest.mark.gpu
def test_gpu_matches_reference_seed_shape():
    logits = (torch.randn(8192, 50257, device="cuda") * 2).to(torch.bfloat16)
    labels = _labels(8192, 50257).cuda()
    out, grad, up = _loss_and_grad(triton_ce, logits, labels, "mean", 1e-4, torch.tensor(1.7))
    ref, ref_grad, _ = _loss_and_grad(cross_entropy_ref, logits.double(), labels, "mean", 1e-4, up)
    base, base_grad, _ = _loss_and_grad(cross_entropy_ref, logits, labels, "mean", 1e-4, up)
    assert_kernel_close(out, ref, base, name="loss")
    assert_kernel_close(grad, ref_grad, base_grad, name="dlogits", elementwise=True)


@pytest.mark.gpu
def test_gpu_int64_offsets():
    # N * V > 2^31 elements: a row offset computed in int32 would wrap and read the wrong rows
    n_rows, vocab = 33000, 65536  # 2.16e9 elements, 4.3 GB in bf16
    assert n_rows * vocab > 2**31
    logits = torch.randn(n_rows, vocab, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, vocab, (n_rows,), device="cuda")
    x = logits.requires_grad_(True)
    loss = triton_ce(x, labels, reduction="none")
    tail = slice(n_rows - 4, n_rows)  # rows whose offsets are past 2^31
    ref = cross_entropy_ref(logits.detach()[tail], labels[tail], reduction="none")
    torch.testing.assert_close(loss[tail], ref, rtol=0, atol=1e-4)
    (grad,) = torch.autograd.grad(loss[tail].sum(), x)
    xt = logits.detach()[tail].float().requires_grad_(True)
    (ref_grad,) = torch.autograd.grad(cross_entropy_ref(xt, labels[tail], reduction="sum"), xt)
    torch.testing.assert_close(grad[tail].float(), ref_grad, rtol=0, atol=4e-3)
    assert (grad[: n_rows - 4] == 0).all()


@pytest.mark.gpu
def test_gpu_no_host_sync():
    """Forward and backward never wait on the GPU (the mean's count stays on the device)."""
    logits = torch.randn(64, 1000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = _labels(64, 1000).cuda()
    triton_ce(logits, labels).backward()  # warm-up: compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for reduction in ("mean", "sum", "none"):
            triton_ce(logits, labels, reduction=reduction, z_loss=1e-4).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
