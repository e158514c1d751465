"""Fused linear + cross-entropy (octo_kernels/linear_cross_entropy.py) against its reference.

The Triton part runs through the interpreter on CPU tensors (backend="triton"). Shapes stay
small, so the chunking is forced with a small MIN_CHUNK_ELEMENTS where a test wants several
chunks (chunk = 2 * C rows then). Tolerance rule of tests/numerics.py, against the reference
on fp64-upcast inputs (see tests/test_kernels_cross_entropy.py for why fp64).
"""

from __future__ import annotations

import functools
import sys

import pytest
import torch

from octo_kernels import cross_entropy_ref, linear_cross_entropy, linear_cross_entropy_ref
from tests.numerics import assert_kernel_close

lce_mod = sys.modules["octo_kernels.linear_cross_entropy"]
triton_lce = functools.partial(linear_cross_entropy, backend="triton")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 2 * C rows even for tiny heads, so small tests walk several chunks."""
    monkeypatch.setattr(lce_mod, "MIN_CHUNK_ELEMENTS", 1)


def _run(fn, hidden, weight, labels, reduction="mean", z_loss=0.0, upstream=None):
    """loss, dL/dhidden, dL/dweight of sum(upstream * loss) (upstream 1.7, or random per row)."""
    h = hidden.detach().requires_grad_(True)
    w = weight.detach().requires_grad_(True)
    loss = fn(h, w, labels, reduction=reduction, z_loss=z_loss)
    if upstream is None:
        upstream = torch.full((), 1.7) if reduction != "none" else torch.rand(labels.shape[0])
    dh, dw = torch.autograd.grad((loss * upstream).sum(), (h, w))
    return loss.detach(), dh, dw, upstream


def check_against_reference(hidden, weight, labels, reduction="mean", z_loss=0.0):
    out, dh, dw, up = _run(triton_lce, hidden, weight, labels, reduction, z_loss)
    ref, ref_dh, ref_dw, _ = _run(
        linear_cross_entropy_ref, hidden.double(), weight.double(), labels, reduction, z_loss, up
    )
    base, base_dh, base_dw, _ = _run(
        linear_cross_entropy_ref, hidden, weight, labels, reduction, z_loss, up
    )
    assert out.dtype == torch.float32
    assert dh.dtype == hidden.dtype and dw.dtype == weight.dtype
    assert_kernel_close(out, ref, base, name=f"loss ({reduction})")
    assert_kernel_close(dh, ref_dh, base_dh, name=f"dhidden ({reduction})")
    assert_kernel_close(dw, ref_dw, base_dw, name=f"dweight ({reduction})")


def _inputs(n_rows, vocab, n_hidden, dtype=torch.float32, ignore_every=5):
    hidden = torch.randn(n_rows, n_hidden).to(dtype)
    weight = (torch.randn(vocab, n_hidden) / n_hidden**0.5).to(dtype)
    labels = torch.randint(0, vocab, (n_rows,))
    labels[::ignore_every] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_reference_over_chunks(small_chunks, dtype, reduction):
    hidden, weight, labels = _inputs(40, 301, 8, dtype)  # chunks of 16: 16 + 16 + 8 rows
    assert lce_mod.chunk_rows(40, 301, 8) == 16
    check_against_reference(hidden, weight, labels, reduction, z_loss=1e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "n_rows,vocab,n_hidden",
    [(1, 777, 24), (199, 777, 24), (3, 50257, 32), (1, 777, 760), (199, 301, 1128)],
)
def test_matches_reference_shapes(n_rows, vocab, n_hidden, dtype):
    hidden, weight, labels = _inputs(n_rows, vocab, n_hidden, dtype, ignore_every=7)
    check_against_reference(hidden, weight, labels, "sum" if n_rows == 1 else "mean")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_inputs(small_chunks, dtype):
    _, _, labels = _inputs(40, 129, 16)
    hidden = torch.randn(40, 20).to(dtype)[:, 2:18]  # row stride 20
    weight = torch.randn(16, 129).to(dtype).t()  # (V, C) transposed view
    assert not hidden.is_contiguous() and not weight.is_contiguous()
    check_against_reference(hidden, weight, labels, "mean")
    check_against_reference(hidden, weight, labels, "none", z_loss=1e-4)


def test_autocast_fp32_weight_gets_fp32_gradient(small_chunks):
    hidden, weight, labels = _inputs(50, 257, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, dh, dw, up = _run(triton_lce, hidden, weight, labels)
        base, base_dh, base_dw, _ = _run(
            linear_cross_entropy_ref, hidden, weight, labels, upstream=up
        )
    ref, ref_dh, ref_dw, _ = _run(
        linear_cross_entropy_ref, hidden.double(), weight.double(), labels, upstream=up
    )
    assert dh.dtype == torch.float32 and dw.dtype == torch.float32  # autograd casts back
    assert_kernel_close(out, ref, base, name="loss")
    # the fused weight gradient stays in the fp32 accumulator; eager rounds it through bf16
    assert_kernel_close(dw, ref_dw, base_dw, name="dweight")
    assert_kernel_close(dh, ref_dh, base_dh, name="dhidden")


def test_only_the_gradients_asked_for():
    hidden, weight, labels = _inputs(20, 64, 8)
    h = hidden.clone().requires_grad_(True)
    loss = triton_lce(h, weight, labels)  # frozen head
    (dh,) = torch.autograd.grad(loss, h)
    w = weight.clone().requires_grad_(True)
    loss2 = triton_lce(hidden, w, labels)  # frozen features
    (dw,) = torch.autograd.grad(loss2, w)
    _, ref_dh, ref_dw, _ = _run(linear_cross_entropy_ref, hidden, weight, labels, upstream=1.0)
    torch.testing.assert_close(dh, ref_dh, rtol=0, atol=1e-6)
    torch.testing.assert_close(dw, ref_dw, rtol=0, atol=1e-6)
    with torch.no_grad():  # evaluation: no gradient work at all
        torch.testing.assert_close(
            triton_lce(h, w, labels), linear_cross_entropy_ref(hidden, weight, labels)
        )


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_ignored_gives_zero_loss_and_gradients(small_chunks, dtype, backend):
    hidden, weight, _ = _inputs(40, 100, 8, dtype)
    labels = torch.full((40,), -100)
    fn = functools.partial(linear_cross_entropy, backend=backend)
    for reduction in ("mean", "sum", "none"):
        loss, dh, dw, _ = _run(fn, hidden, weight, labels, reduction, z_loss=1e-3)
        assert torch.isfinite(loss).all() and (loss == 0).all(), reduction
        assert (dh == 0).all() and (dw == 0).all(), reduction
        assert loss.shape == ((40,) if reduction == "none" else ()), reduction


def test_chunk_rows_bounds_the_logits_block():
    assert lce_mod.chunk_rows(8192, 50257, 768) == 1024  # the seed model
    assert lce_mod.chunk_rows(65536, 50257, 4096) == 8192
    assert lce_mod.chunk_rows(8192, 512, 64) == 8192  # small head: one chunk (4M logits)
    assert lce_mod.chunk_rows(1, 50257, 768) == 1
    for n_rows in (1, 100, 8192, 65536, 10**6):
        for vocab in (2, 300, 32000, 50257, 128256, 262144):
            for n_hidden in (8, 64, 768, 4096, 8192):
                chunk = lce_mod.chunk_rows(n_rows, vocab, n_hidden)
                assert 1 <= chunk <= n_rows
                assert chunk == n_rows or chunk & (chunk - 1) == 0  # a power of two
                assert chunk == n_rows or chunk >= 16
                budget = max(2 * vocab * n_hidden, lce_mod.MIN_CHUNK_ELEMENTS, 16 * vocab)
                assert chunk * vocab <= budget  # the peak logits block is O(V * C), not O(N * V)
    with pytest.raises(ValueError, match="positive"):
        lce_mod.chunk_rows(0, 10, 10)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_logits_never_exist_beyond_one_chunk(small_chunks, monkeypatch, reduction):
    """Structural memory test: every logits block handed to the CE kernel (forward and, for
    "none", the backward's recomputation) has at most chunk_rows rows; the (N, V) never does."""
    seen = []
    launch = lce_mod.ce_forward_launch

    def spy(logits, *args, **kwargs):
        seen.append(tuple(logits.shape))
        return launch(logits, *args, **kwargs)

    monkeypatch.setattr(lce_mod, "ce_forward_launch", spy)
    hidden, weight, labels = _inputs(100, 90, 8)
    _run(triton_lce, hidden, weight, labels, reduction)
    chunk = lce_mod.chunk_rows(100, 90, 8)
    assert chunk == 16
    per_pass = [(16, 90)] * 6 + [(4, 90)]
    assert seen == per_pass * (2 if reduction == "none" else 1)


def test_label_outside_vocab_is_nan_on_triton_and_raises_on_reference():
    hidden, weight, _ = _inputs(4, 50, 8)
    labels = torch.tensor([3, 50, -100, -1])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        linear_cross_entropy_ref(hidden, weight, labels)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        linear_cross_entropy(hidden, weight, labels, backend="torch")
    loss, dh, _, _ = _run(triton_lce, hidden, weight, labels, "none")
    assert torch.isfinite(loss[[0, 2]]).all() and loss[[1, 3]].isnan().all()
    assert torch.isfinite(dh[[0, 2]]).all() and dh[[1, 3]].isnan().all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_input_raises_one_clear_line(backend):
    hidden, weight, labels = _inputs(4, 10, 8)
    cases = [
        ((hidden, weight[:, :7], labels), "must be \\(N, C\\) and \\(V, C\\)"),
        ((hidden, weight.double(), labels), "cast one of them or run under torch.autocast"),
        ((hidden, weight.to("meta"), labels), "move both"),
        ((hidden, weight, labels[:3]), "labels"),
        ((hidden, weight, labels.to("meta")), "move both"),
        ((hidden, weight, labels.float()), "int64 or int32"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            linear_cross_entropy(*args, backend=backend)


def test_reference_is_linear_then_cross_entropy():
    hidden, weight, labels = _inputs(6, 40, 8)
    torch.testing.assert_close(
        linear_cross_entropy_ref(hidden, weight, labels, reduction="none"),
        cross_entropy_ref(hidden @ weight.t(), labels, reduction="none"),
    )


def test_opcheck(small_chunks):
    hidden, weight, labels = _inputs(6, 70, 8)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    for reduction in ("mean", "none"):
        args = (hidden, weight, labels, -100, reduction, 1e-3, True, True)
        torch.library.opcheck(lce_mod.linear_cross_entropy_fwd, args)
    dloss = torch.ones(1).expand(6)  # stride 0
    args = (hidden.detach(), weight.detach(), labels, dloss, -100, 0.0, True, False)
    torch.library.opcheck(lce_mod.linear_cross_entropy_bwd, args)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_compile_fullgraph_matches_eager(small_chunks, reduction):
    hidden, weight, labels = _inputs(20, 70, 8)  # 2 chunks

    def step(h, w, y):
        loss = triton_lce(h, w, y, reduction=reduction, z_loss=1e-3)
        return loss.sum() if reduction == "none" else loss

    h_e, w_e = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss_e = step(h_e, w_e, labels)
    loss_e.backward()
    h_c, w_c = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss_c = torch.compile(step, fullgraph=True)(h_c, w_c, labels)
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss_e, rtol=0, atol=1e-5)
    torch.testing.assert_close(h_c.grad, h_e.grad, rtol=0, atol=1e-7)
    torch.testing.assert_close(w_c.grad, w_e.grad, rtol=0, atol=1e-7)


@pytest.mark.gpu
def test_gpu_peak_memory_quarter_of_eager():
    """Seed shape, bf16: peak memory above the inputs during forward + backward of the fused
    path is at most 25% of the eager reference's (the issue's target)."""
    torch.manual_seed(0)
    n_rows, vocab, n_hidden = 8192, 50257, 768
    hidden = torch.randn(n_rows, n_hidden, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(vocab, n_hidden, device="cuda", dtype=torch.bfloat16) / 30
    labels = torch.randint(0, vocab, (n_rows,), device="cuda")

    def peak(fn):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(h, w, labels).backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    fused = peak(triton_lce)
    eager = peak(linear_cross_entropy_ref)
    assert fused <= 0.25 * eager, f"fused peak {fused / 2**20:.0f} MiB vs eager {eager / 2**20:.0f}"
    assert lce_mod.chunk_rows(2500, vocab, n_hidden) == 1024  # 3 chunks: the fp32 accumulation
    check_against_reference(hidden[:2500], weight, labels[:2500], "mean")


@pytest.mark.gpu
def test_gpu_no_host_sync():
    """Forward and backward never wait on the GPU (the mean's count stays on the device)."""
    hidden = torch.randn(3000, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(5000, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 5000, (3000,), device="cuda")
    labels[::3] = -100
    triton_lce(hidden, weight, labels).backward()  # warm-up: kernels, the matmul probe
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for reduction in ("mean", "sum", "none"):
            triton_lce(hidden, weight, labels, reduction=reduction).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
