"""Octo's fused ops, each beside its pure-PyTorch reference.

    rms_norm(x, weight, eps)                          x (..., C), weight (C,)
    apply_rope(q, k, cos, sin, position_offset=0)     q (B, Hq, T, D), k (B, Hkv, T, D)
    cross_entropy(logits, labels, ignore_index=-100)  logits (N, V), labels (N,)
    linear_cross_entropy(hidden, weight, labels)      hidden (N, C), weight (V, C)

OCTO_KERNELS=auto|triton|torch (or backend=...) picks the implementation: see octo_kernels.backend.
This package imports nothing of the project.
"""

from octo_kernels.backend import describe, requested_backend, triton_available
from octo_kernels.cross_entropy import cross_entropy, cross_entropy_ref
from octo_kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_ref
from octo_kernels.rmsnorm import rms_norm, rms_norm_ref
from octo_kernels.rope import apply_rope, apply_rope_ref, rotate_half

__all__ = [
    "apply_rope",
    "apply_rope_ref",
    "cross_entropy",
    "cross_entropy_ref",
    "describe",
    "linear_cross_entropy",
    "linear_cross_entropy_ref",
    "requested_backend",
    "rms_norm",
    "rms_norm_ref",
    "rotate_half",
    "triton_available",
]
