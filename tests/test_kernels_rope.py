"""RoPE: the Triton kernel (interpreted on CPU, compiled on a GPU) against the fp32 reference.

Outputs and the q/k gradients, fp32/bf16/fp16, grouped-query heads down to one KV head, the
model's transposed (B, T, H, D) memory layout and other non-contiguous inputs, (B, P, D) tables,
position offsets (KV-cache decoding), transformers' convention, the torch.library contract
(opcheck), torch.compile(fullgraph=True) against eager, and bad input.

Tolerance (tests/numerics.py): error against the truth <= 2 x the error of the same-dtype PyTorch
computation (the reference run on the kernel's dtype) + atol. The truth is the reference on inputs
upcast to fp64 (it then computes in fp64), so that for fp32 the baseline's own rounding counts too.
"""

from __future__ import annotations

import pytest
import torch
from numerics import FAR_STRIDE, assert_kernel_close, far_view

from octo_kernels.backend import interpreting
from octo_kernels.rope import apply_rope, apply_rope_ref, rope

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _tables(P: int, D: int, theta: float = 10000.0, batch: int | None = None):
    """Rotate-half cos/sin (P, D) fp32, or (B, P, D) with a different position ramp per row."""
    inv_freq = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D)  # (D/2,)
    pos = torch.arange(P, dtype=torch.float32)
    if batch is not None:
        pos = pos[None, :] * torch.arange(1, batch + 1, dtype=torch.float32)[:, None]  # (B, P)
    freqs = pos[..., None] * inv_freq  # (..., P, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _fwd_bwd(fn, q, k, gq, gk):
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    qo, ko = fn(q, k)
    torch.autograd.backward([qo, ko], [gq, gk])
    return qo.detach(), ko.detach(), q.grad, k.grad


def _used_kernel(out: torch.Tensor) -> bool:
    return "octo_rope" in type(out.grad_fn).__name__


def _check_against_reference(q, k, cos, sin, offset=0):
    gq = torch.randn(q.shape, dtype=q.dtype, device=q.device)
    gk = torch.randn(k.shape, dtype=k.dtype, device=k.device)
    qk, kk = q.detach().requires_grad_(), k.detach().requires_grad_()
    qo, ko = apply_rope(qk, kk, cos, sin, offset, backend="triton")
    assert _used_kernel(qo) and _used_kernel(ko), "the Triton op did not run"
    torch.autograd.backward([qo, ko], [gq, gk])
    ref = _fwd_bwd(
        lambda a, b: apply_rope_ref(a, b, cos, sin, offset), q.double(), k.double(), gq.double(),
        gk.double(),
    )  # fmt: skip
    base = _fwd_bwd(lambda a, b: apply_rope_ref(a, b, cos, sin, offset), q, k, gq, gk)
    outs = (qo, ko, qk.grad, kk.grad)
    for name, out, r, b in zip(("q_out", "k_out", "dq", "dk"), outs, ref, base):
        assert out.dtype == b.dtype and out.shape == b.shape, name
        assert_kernel_close(out, r, b, name=f"{name} ({q.dtype}, q {tuple(q.shape)})")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "B, Hq, Hkv, T, D",
    [(2, 4, 1, 7, 64), (1, 12, 3, 33, 64), (3, 6, 6, 5, 96), (1, 4, 2, 1, 64), (1, 4, 1, 199, 64)],
    ids=["one_kv_head", "gqa_12_3", "mha_d96", "one_token", "tokens_199"],
)
def test_matches_reference(B, Hq, Hkv, T, D, dtype):
    q = torch.randn(B, Hq, T, D, dtype=dtype)
    k = torch.randn(B, Hkv, T, D, dtype=dtype)
    cos, sin = _tables(T, D)
    _check_against_reference(q, k, cos, sin)


@pytest.mark.parametrize("dtype", DTYPES)
def test_model_layout_and_batched_tables(dtype):
    # The model's q/k are proj(x).view(B, T, H, D).transpose(1, 2): strided, last dim contiguous.
    B, T, Hq, Hkv, D = 2, 9, 4, 2, 32
    q = torch.randn(B, T, Hq, D, dtype=dtype).transpose(1, 2)
    k = torch.randn(B, T, Hkv, D, dtype=dtype).transpose(1, 2)
    cos, sin = _tables(T + 3, D, batch=B)  # (B, P, D)
    _check_against_reference(q, k, cos, sin, offset=3)
    qo, _ = apply_rope(q, k, cos, sin, 3, backend="triton")
    assert qo.stride() == q.stride()  # same layout out: no transpose copy either way


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_last_dim_and_tables(dtype):
    q = torch.randn(2, 4, 6, 2 * 64).to(dtype)[..., ::2]  # last dim stride 2: copied in the op
    k = torch.randn(2, 1, 6, 64).to(dtype)
    cos, sin = _tables(20, 128)
    _check_against_reference(q, k, cos[4:, ::2], sin[4:, ::2], offset=2)  # strided tables


@pytest.mark.skipif(not interpreting(), reason="CPU interpreter only (a sparse-file view)")
def test_int64_offsets_past_2_pow_31(tmp_path):
    # q's batches 2^30 + 64 elements apart: batch 2 starts past 2^31, where an int32 offset wraps
    # (and, from tests/numerics.far_view's layout, reads zeros: that batch's output is wrong)
    B, Hq, Hkv, T, D = 3, 4, 1, 5, 32
    q = far_view(tmp_path, (B, Hq, T, D), (FAR_STRIDE, T * D, D, 1), torch.bfloat16)
    q.copy_(torch.randn(B, Hq, T, D).to(torch.bfloat16))
    k = torch.randn(B, Hkv, T, D).to(torch.bfloat16)
    cos, sin = _tables(T, D)
    _check_against_reference(q, k, cos, sin)


def test_position_offset_is_a_decoding_step():
    # Rotating token t alone with position_offset=t equals row t of the full-sequence rotation.
    B, Hq, Hkv, T, D = 2, 4, 2, 11, 64
    q, k = torch.randn(B, Hq, T, D), torch.randn(B, Hkv, T, D)
    cos, sin = _tables(16, D)
    q_full, k_full = apply_rope(q, k, cos, sin, backend="triton")
    q_step, k_step = apply_rope(q[:, :, -1:], k[:, :, -1:], cos, sin, T - 1, backend="triton")
    torch.testing.assert_close(q_step, q_full[:, :, -1:], rtol=0, atol=0)
    torch.testing.assert_close(k_step, k_full[:, :, -1:], rtol=0, atol=0)


def test_matches_transformers_convention():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    B, Hq, Hkv, T, D = 2, 4, 2, 10, 64
    q, k = torch.randn(B, Hq, T, D), torch.randn(B, Hkv, T, D)
    cos, sin = _tables(T, D)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos[None].expand(B, T, D), sin[None].expand(B, T, D))
    q_o, k_o = apply_rope(q, k, cos, sin, backend="triton")
    torch.testing.assert_close(q_o, q_hf, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k_o, k_hf, rtol=1e-6, atol=1e-6)


def test_backward_is_inverse_rotation():
    q, k = torch.randn(2, 4, 8, 64), torch.randn(2, 1, 8, 64)
    cos, sin = _tables(8, 64)
    q_rot, k_rot = rope(q, k, cos, sin, 0, False)
    q_back, k_back = rope(q_rot, k_rot, cos, sin, 0, True)
    torch.testing.assert_close(q_back, q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_back, k, rtol=1e-5, atol=1e-5)


def test_expanded_stride0_grad():
    # Gradients such as the grad of .sum() can be expanded stride-0 tensors; the outputs must not
    # inherit the overlap and the values must equal those from the materialised gradient.
    cos, sin = _tables(5, 32)
    for g in (torch.randn(()).expand(2, 3, 5, 32), torch.randn(32).expand(2, 3, 5, 32)):
        gk = g[:, :1]
        out = rope(g, gk, cos, sin, 0, True)
        ref = rope(g.contiguous(), gk.contiguous(), cos, sin, 0, True)
        for o, r in zip(out, ref):
            assert o.is_contiguous()
            torch.testing.assert_close(o, r, rtol=0, atol=0)


def test_opcheck():
    q = torch.randn(2, 4, 5, 32, requires_grad=True)
    k = torch.randn(2, 2, 5, 32, requires_grad=True)
    cos, sin = _tables(8, 32)
    for transpose in (False, True):
        torch.library.opcheck(rope, (q, k, cos, sin, 2, transpose))
    qt = torch.randn(2, 5, 4, 32).transpose(1, 2).requires_grad_()
    torch.library.opcheck(rope, (qt, k, cos, sin, 0, False))


def test_compile_fullgraph_matches_eager():
    def loss(q, k, cos, sin):
        qo, ko = apply_rope(q, k, cos, sin, backend="triton")
        return qo.sum() + 2 * ko.sum()

    B, T, Hq, Hkv, D = 2, 6, 4, 1, 32
    q = torch.randn(B, T, Hq, D).transpose(1, 2)
    k = torch.randn(B, Hkv, T, D)
    cos, sin = _tables(T, D)
    results = []
    for fn in (loss, torch.compile(loss, fullgraph=True)):
        qg, kg = q.detach().requires_grad_(), k.detach().requires_grad_()
        out = fn(qg, kg, cos, sin)
        out.backward()
        results.append((out.detach(), qg.grad, kg.grad))
    for name, a, b in zip(("loss", "dq", "dk"), *results):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, msg=name)


def test_table_gradients_fall_back_to_reference():
    q, k = torch.randn(1, 2, 4, 16), torch.randn(1, 1, 4, 16)
    cos, sin = _tables(4, 16)
    cos.requires_grad_()
    qo, ko = apply_rope(q, k, cos, sin, backend="triton")
    assert not _used_kernel(qo)
    (qo.sum() + ko.sum()).backward()
    assert cos.grad is not None and cos.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_input_raises(backend):
    q, k = torch.randn(2, 4, 6, 32), torch.randn(2, 2, 6, 32)
    cos, sin = _tables(6, 32)
    cases = [
        ((q, torch.randn(2, 3, 6, 32), cos, sin, 0), "not a multiple of 3 KV heads"),
        ((q, torch.randn(2, 2, 5, 32), cos, sin, 0), "does not match q"),
        ((q[0], k, cos, sin, 0), r"must be \(B, H, T, D\)"),
        ((torch.randn(2, 4, 6, 31), torch.randn(2, 2, 6, 31), cos, sin, 0), "must be even"),
        ((q, k, cos[:, :16], sin[:, :16], 0), r"must be \(P, 32\)"),
        ((q, k, cos, sin, 1), "need position_offset \\+ T = 7"),
        ((q, k, cos, sin, -1), "must be >= 0"),
        ((q, k, cos[None].expand(3, 6, 32), sin[None].expand(3, 6, 32), 0), "cos batch 3"),
        ((q, k.to("meta"), cos, sin, 0), "must be on one device"),
        ((q.long(), k.long(), cos, sin, 0), "floating point"),
    ]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg):
            apply_rope(*args, backend=backend)


# ---------------------------------------------------------------------------- GPU (compiled)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "B, Hq, Hkv, T, D",
    [(2, 4, 1, 7, 64), (16, 12, 3, 512, 64), (2, 32, 8, 2048, 128), (1, 6, 2, 33, 96)],
)
def test_gpu_matches_reference(B, Hq, Hkv, T, D, dtype):
    q = torch.randn(B, T, Hq, D, dtype=dtype, device="cuda").transpose(1, 2)
    k = torch.randn(B, Hkv, T, D, dtype=dtype, device="cuda")
    cos, sin = (t.cuda() for t in _tables(T + 5, D))
    _check_against_reference(q, k, cos, sin, offset=5)
