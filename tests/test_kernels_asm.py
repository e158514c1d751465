"""What the Triton kernels compile to for a Hopper GPU (sm_90), checked on a CPU.

Speed is measured on a GPU (bench/), but some of its causes are facts about the compiled code that
CI can hold without one: no kernel spills registers to local memory, and a cross-entropy row that
does not start on a 16-byte boundary (V = 50257 in bf16) gets the same 16-byte vector loads and
stores as an aligned one (before the aligned walk it got 16-bit ones and twice the registers).
bench/kernel_asm.py compiles the kernels through their real launch code at the benchmark shapes,
in a process of its own (this one interprets Triton), and reads the cubins with Triton's
cuobjdump.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from octo_kernels.backend import triton_available

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def launches() -> list[dict]:
    if not triton_available():
        pytest.skip("Triton does not import here")
    tools = Path(sys.modules["triton"].__file__).parent / "backends" / "nvidia" / "bin"
    if not (tools / "cuobjdump").exists():
        pytest.skip(f"Triton's NVIDIA tools are not installed ({tools / 'cuobjdump'} is missing)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "bench.kernel_asm", "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout)
    assert {r["case"].split()[0] for r in rows} == {"rmsnorm", "rope", "cross_entropy"}
    return rows


def test_no_kernel_spills_registers(launches):
    spilled = [(r["case"], r["kernel"], r["stack"]) for r in launches if r["stack"]]
    assert not spilled, f"local memory (spills) in {spilled}"


def test_rmsnorm_and_rope_move_no_narrow_elements(launches):
    """Their bf16 tensors move as 16-byte vectors (or 8-byte for a short row of weights); no
    16-bit global load or store."""
    for r in launches:
        if r["case"].startswith(("rmsnorm", "rope")):
            ops = {**r["loads"], **r["stores"], **r["async_copies"]}
            narrow = {k: n for k, n in ops.items() if k.endswith((".16", ".8"))}
            assert not narrow, f"{r['case']} {r['kernel']}: {narrow}"
            assert r["loads"].get("LDG.128", 0) + r["async_copies"].get("LDGSTS.128", 0) > 0


def test_cross_entropy_rows_off_16_byte_boundaries_get_vector_access(launches):
    """V = 50257 bf16 (each row starts at a different offset from a 16-byte boundary) against
    V = 50304 (every row aligned), in each of the three kernels (forward, backward, forward
    writing the gradient): the column blocks are read (and the gradient written) in 128-bit
    vectors, and no more registers are used. Before the aligned walk, 50257 compiled to 16-bit
    loads and stores only and twice the registers. (The < 16-byte ragged ends are read with
    narrow loads, once per row; Triton 3.6 vectorizes them for aligned rows, 3.9 does not, so
    their count is not compared.)"""
    by_vocab = {
        v: [r for r in launches if r["case"] == f"cross_entropy 8192x{v}"] for v in (50257, 50304)
    }
    assert [r["kernel"] for r in by_vocab[50257]] == [r["kernel"] for r in by_vocab[50304]]
    assert len(by_vocab[50257]) == 3
    for odd, even in zip(by_vocab[50257], by_vocab[50304]):
        name = odd["kernel"]
        assert odd["loads"].get("LDG.128", 0) >= 2, (name, odd["loads"])
        if even["stores"].get("STG.128", 0):  # the kernels that write the gradient
            assert odd["stores"].get("STG.128", 0) >= 2, (name, odd["stores"])
        assert odd["regs"] <= even["regs"], (name, odd["regs"], even["regs"])
