"""Which implementation an op runs: the Triton kernel or the pure-PyTorch reference.

`OCTO_KERNELS` (environment) or an explicit `backend=` argument picks it:
  auto   - Triton for CUDA tensors when Triton imports, the reference elsewhere (default);
  triton - Triton always, also on CPU tensors under TRITON_INTERPRET=1 (how CI proves the math);
  torch  - the reference always.
This module imports nothing of the project.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

BACKENDS = ("auto", "triton", "torch")


def _probe_triton() -> bool:
    try:
        import triton  # noqa: F401  (lazy: optional; absent on macOS and Windows)
        import triton.language  # noqa: F401  (lazy: as above)
    except Exception:
        return False
    return True


# Probed once at import (not lru_cache'd): torch.compile then reads a plain constant.
_TRITON_AVAILABLE = _probe_triton()


def triton_available() -> bool:
    """True when `import triton` works (it does not on macOS or Windows)."""
    return _TRITON_AVAILABLE


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


if _TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    # Read once, like Triton itself reads TRITON_INTERPRET when a kernel is decorated.
    _INTERPRETED = tl.constexpr(interpreting())

    @triton.jit
    def cast_like(x, PTR):
        """Cast fp32 `x` to PTR's element type, rounding to nearest even, for tl.store.

        On a GPU this is `x.to(...)`. Triton 3.9's interpreter truncates fp32 -> bf16 (round
        toward zero, up to 1 ulp off), which would make CPU tests of bf16 outputs fail the
        tolerance rule for a reason the GPU does not have; there the rounding is done by hand
        (add half an ulp, ties to even, then truncate). NaN stays NaN.
        """
        if _INTERPRETED:
            if PTR.dtype.element_ty == tl.bfloat16:
                bits = x.to(tl.uint32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
                x = tl.where(x == x, bits.to(tl.float32, bitcast=True), x)
        return x.to(PTR.dtype.element_ty)


# OCTO_TRITON_OP=1 (read once, at import): register the RMSNorm and RoPE ops with
# `torch.library.triton_op` instead of `custom_op`. torch.compile then traces into the op and
# Inductor launches the Triton kernels from its own generated code, instead of calling back into
# Python through the dispatcher and Triton's launcher for each of the ~74 RMSNorm/RoPE calls of a
# micro-batch (issue 8: the compiled step is host bound). An experiment until measured on a GPU
# (bench/NOTES.md; bench/gpu.sh measures it). Eager calls work everywhere, also interpreted; under
# TRITON_INTERPRET=1, torch.compile cannot trace a triton_op (DESIGN.md's first trap).
INLINE_TRITON = os.environ.get("OCTO_TRITON_OP", "0") == "1" and _TRITON_AVAILABLE


def library_op(name: str, fake: Callable) -> Callable[[Callable], Any]:
    """Decorator registering `fn` as the torch.library op `name` with no mutated inputs.

    OCTO_TRITON_OP=1: a `triton_op` (its fake is derived by tracing `fn`, whose kernel launches
    must go through `launcher`). Otherwise a `custom_op` with the explicit `fake` (opaque to
    torch.compile). Either way the result takes `register_autograd`. (Cross-entropy and linear
    cross-entropy keep plain custom_ops: one call each per micro-batch.)"""

    def register(fn: Callable) -> Any:
        if INLINE_TRITON:
            return torch.library.triton_op(name, fn, mutates_args=())
        op = torch.library.custom_op(name, fn, mutates_args=())
        op.register_fake(fake)
        return op

    return register


def launcher(kernel: Any) -> Any:
    """`kernel` for `kernel[grid](...)`; wrapped by `torch.library.wrap_triton` when the ops are
    triton_ops, so tracing records the launch (eager calls go straight to the kernel). Not under
    the interpreter, where nothing traces them: torch 2.11's wrap_triton rejects an interpreted
    kernel ("only works on functions annotated with triton.jit"), 2.13's passes it through."""
    if INLINE_TRITON and not interpreting():
        return torch.library.wrap_triton(kernel)
    return kernel


def requested_backend(backend: str | None = None) -> str:
    """The backend asked for: the explicit argument, else OCTO_KERNELS, else "auto"."""
    name = backend if backend is not None else os.environ.get("OCTO_KERNELS", "auto")
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(
            f"unknown kernel backend {name!r} (from "
            f"{'argument' if backend is not None else 'OCTO_KERNELS'}); use one of {BACKENDS}"
        )
    return name


def use_triton(*tensors: torch.Tensor, backend: str | None = None) -> bool:
    """Decide whether the Triton path runs for these tensors.

    "triton" insists: it raises when Triton is missing, or when a tensor is on the CPU and the
    interpreter is off (a Triton kernel cannot run there), instead of silently falling back.
    """
    name = requested_backend(backend)
    if name == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if name == "auto":
        return on_cuda and triton_available()
    if not triton_available():
        raise RuntimeError("kernel backend 'triton' requested but Triton does not import")
    if not on_cuda and not interpreting():
        raise RuntimeError(
            "kernel backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 "
            "(or use OCTO_KERNELS=auto to fall back to the reference)"
        )
    return True


def describe(device: torch.device | str = "cuda") -> str:
    """One phrase for logs: which implementation the ops will use on `device`."""
    name = requested_backend()
    dev = torch.device(device)
    if name == "torch":
        return "reference (PyTorch), OCTO_KERNELS=torch"
    if name == "auto":
        if dev.type == "cuda" and triton_available():
            return "fused Triton kernels"
        return "reference (PyTorch): Triton kernels run on CUDA tensors only"
    return "fused Triton kernels" + (" (interpreted)" if dev.type != "cuda" else "")
