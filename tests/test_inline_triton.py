"""OCTO_TRITON_OP=1: the RMSNorm and RoPE ops registered as `torch.library.triton_op`s, so
torch.compile traces into them and Inductor launches the Triton kernels itself
(octo_kernels.backend).

The flag is read when `octo_kernels` is imported, so each case runs in a fresh Python process. On a
CPU the ops run eagerly under the interpreter (torch.compile cannot trace a triton_op there:
DESIGN.md's first trap); the compiled case needs a GPU.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.child_env import child_env

ROOT = Path(__file__).resolve().parents[1]

EAGER = """
import torch, octo_kernels
from torch._subclasses.functional_tensor import FunctionalTensorMode
from octo_kernels.backend import INLINE_TRITON
from octo_kernels.rmsnorm import rms_norm_bwd, rms_norm_fwd, rms_norm_ref
from octo_kernels.rope import apply_rope_ref, rope
assert INLINE_TRITON
# a triton_op decomposes into its kernel launches under functionalization (what lets Inductor
# see them); a custom_op registers no such rule (torch 2.13's CustomOpDef keeps it here)
for op in (rms_norm_fwd, rms_norm_bwd, rope):
    assert FunctionalTensorMode in op._torch_dispatch_fns, op
torch.manual_seed(0)
dev = "cuda" if torch.cuda.is_available() else "cpu"
x = torch.randn(199, 760, device=dev, requires_grad=True)
w = torch.randn(760, device=dev, requires_grad=True)
g = torch.randn(199, 760, device=dev)
got = torch.autograd.grad(octo_kernels.rms_norm(x, w, 1e-6, backend="triton"), (x, w), g)
want = torch.autograd.grad(rms_norm_ref(x, w, 1e-6), (x, w), g)
for a, b in zip(got, want):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
q = torch.randn(2, 4, 9, 16, device=dev, requires_grad=True)
k = torch.randn(2, 1, 9, 16, device=dev, requires_grad=True)
ang = torch.randn(9, 8, device=dev)
cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
gq, gk = torch.randn_like(q), torch.randn_like(k)
outs = {}
for name, fn in (("triton", lambda: octo_kernels.apply_rope(q, k, cos, sin, backend="triton")),
                 ("ref", lambda: apply_rope_ref(q, k, cos, sin))):
    qo, ko = fn()
    outs[name] = (qo, ko, *torch.autograd.grad((qo, ko), (q, k), (gq, gk)))
for a, b in zip(outs["triton"], outs["ref"]):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
print("OK")
"""

COMPILED = """
import torch
from torch._inductor.utils import run_and_get_code
from octo import OctoConfig, OctoForCausalLM
torch.manual_seed(0)
cfg = OctoConfig.preset("tiny", vocab_size=256, max_position_embeddings=64)
model = OctoForCausalLM(cfg).cuda()
ids = torch.randint(0, 256, (4, 64), device="cuda")

def loss_and_grads(fn):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = fn(ids, labels=ids).loss
    loss.backward()
    return [loss.detach()] + [p.grad.clone() for p in model.parameters()]

eager = loss_and_grads(model)
compiled = torch.compile(model, fullgraph=True)
got, codes = run_and_get_code(loss_and_grads, compiled)
code = "\\n".join(codes)
for kernel in ("_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel", "_rope_kernel"):
    assert kernel in code, f"{kernel} not launched by Inductor's code"
for op in ("octo.rms_norm_fwd", "octo.rms_norm_bwd", "octo.rope"):
    assert op not in code, f"{op} still called as an opaque op"
# bf16 autocast: Inductor fuses and rounds the elementwise work differently from eager, so the
# comparison is per tensor, relative to its norm (a wrong kernel launch is off by O(1))
for a, b in zip(got, eager):
    err = ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()
    assert err < 2e-2, err
print("OK")
"""


def run_flagged(code: str, interpret: bool) -> str:
    env = child_env(OCTO_TRITON_OP="1")
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout + r.stderr[-4000:]
    return r.stderr


def test_triton_ops_run_eagerly_like_the_references():
    """Registered as triton_ops, the kernels still give the references' values and gradients when
    called eagerly (the launches go through wrap_triton, which runs the kernel directly)."""
    run_flagged(EAGER, interpret=not torch.cuda.is_available())


@pytest.mark.gpu
def test_compiled_model_launches_the_kernels_itself():
    """Under torch.compile(fullgraph=True) Inductor's generated code launches the RMSNorm and RoPE
    Triton kernels directly (no octo:: op calls back into Python), and the loss and gradients
    follow the eager model's (bf16 autocast). Inductor must also have found which arguments each
    kernel writes: where its analysis fails it warns and treats every input as written, copying
    them around each launch, and the experiment would time those copies."""
    stderr = run_flagged(COMPILED, interpret=False)
    assert "identify_mutated_tensors" not in stderr, stderr[-4000:]
