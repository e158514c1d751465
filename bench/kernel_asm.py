"""What Octo's Triton kernels compile to on a Hopper GPU (sm_90), read on a machine without one.

    python -m bench.kernel_asm           # a table: one row per kernel launch of each case
    python -m bench.kernel_asm --json    # the same rows as JSON (tests/test_kernels_asm.py)

Why: the widths of the global loads and stores, the registers, spills and shared memory of a
kernel decide much of its speed, and reading them costs no GPU time (the device tool's METHOD.md:
"are the loads 16 bytes wide, did an array go to local memory"). A property seen here, say 16-bit
loads of bf16 logits rows whose length is odd, is a fact about the code that CI can hold, where a
timing needs a GPU.

How: each case runs the kernels' real launch code (octo_kernels/*.py, the `_launch` functions, so
the tile choices are the ones a GPU gets) on `meta` tensors, with Triton's active driver replaced by
a stand-in that names an sm_90 target and launches nothing. Triton then specialises and compiles
every kernel exactly as for a real H100 (a meta tensor's data_ptr() is 0, i.e. 16-byte aligned, as
CUDA allocations are); the stand-in keeps each cubin, and the CUDA binary tools that ship with
Triton read it: `cuobjdump -res-usage` (registers, stack = spill space, shared memory) and
`cuobjdump -sass` (every LDG / STG / LDGSTS with its width in bits, and the BAR barriers). Counts
are of instructions in the code, not of executions: a load inside a loop counts once.

Needs Triton with its NVIDIA backend (pip's Triton on Linux x86_64 has it) and no GPU. The
interpreter must be off, so this runs in its own process (the CPU test suite interprets).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

os.environ["TRITON_INTERPRET"] = "0"  # compile, do not interpret: set before octo_kernels/ imports
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default; silences its warning

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)  # H100 / H200
_TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


@dataclass
class Launch:
    """One kernel launch of a case, as compiled for TARGET."""

    case: str
    kernel: str
    num_warps: int
    regs: int
    stack: int  # bytes of local memory per thread: > 0 means spills (or a local array)
    shared: int  # bytes
    loads: dict[str, int] = field(default_factory=dict)  # "LDG.16": n instructions, ...
    stores: dict[str, int] = field(default_factory=dict)  # "STG.128": n, ...
    async_copies: dict[str, int] = field(default_factory=dict)  # "LDGSTS.128": n (cp.async)
    barriers: int = 0


class _StandInDriver:
    """Triton's driver interface with an sm_90 target and no device: kernels compile, and a
    launch records which compiled kernel it ran instead of running it."""

    def __init__(self) -> None:
        self.binaries: list[tuple[str, bytes, object]] = []  # (name, cubin, metadata)
        self.launched: list[int] = []  # indices into binaries, one per launch
        self._metadata = None  # the kernel launcher_cls was last made for
        self.utils = self  # Triton calls driver.utils.load_binary / get_device_properties

    @staticmethod
    def is_active() -> bool:
        return True

    def get_current_target(self) -> GPUTarget:
        return TARGET

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_device_properties(self, device: int) -> dict:
        return {"max_shared_mem": 227 * 1024}  # sm_90's per-block limit, all Triton asks

    def load_binary(self, name, cubin, shared, device):
        """Keep the cubin; (module, function, regs, spills, max threads), function = its index."""
        self.binaries.append((name, cubin, self._metadata))
        return None, len(self.binaries) - 1, 0, 0, 1024

    def launcher_cls(self, src, metadata) -> Callable[..., None]:
        self._metadata = metadata  # load_binary follows for the same kernel

        def launch(grid_x, grid_y, grid_z, stream, function, *rest) -> None:
            self.launched.append(function)

        return launch


_DRIVER = _StandInDriver()


def _use_stand_in_driver() -> _StandInDriver:
    """Make the stand-in Triton's active driver for the rest of this process (there is no real
    one to go back to on a machine without a GPU; this module runs in a process of its own)."""
    triton.runtime.driver.set_active(_DRIVER)
    return _DRIVER


def _tool(name: str, *args: str) -> str:
    out = subprocess.run([os.path.join(_TOOLS, name), *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{name} {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout


def _width(opcode: str) -> str:
    """'LDG.E.128' -> 'LDG.128'; 'STG.E.U16' -> 'STG.16'; 'LDG.E' -> 'LDG.32'."""
    head, *mods = opcode.split(".")
    for mod in mods:
        for bits in ("128", "64", "16", "8"):
            if mod in (bits, f"U{bits}", f"S{bits}"):
                return f"{head}.{bits}"
    return f"{head}.32"


def read_cubin(cubin: bytes) -> dict:
    """Registers, stack, shared memory, global memory instructions by width, barriers."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = _tool("cuobjdump", "-res-usage", path)
        sass = _tool("cuobjdump", "-sass", path)
    res = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED):(\d+)", usage)}
    ops = Counter()
    for line in sass.splitlines():
        m = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m and m.group(1).split(".")[0] in ("LDG", "STG", "LDGSTS", "BAR"):
            ops[m.group(1)] += 1
    by = {"LDG": Counter(), "STG": Counter(), "LDGSTS": Counter()}
    for op, n in ops.items():
        head = op.split(".")[0]
        if head in by:
            by[head][_width(op)] += n
    return {
        "regs": res.get("REG", 0),
        "stack": res.get("STACK", 0),
        "shared": res.get("SHARED", 0),
        "loads": dict(by["LDG"]),
        "stores": dict(by["STG"]),
        "async_copies": dict(by["LDGSTS"]),
        "barriers": sum(n for op, n in ops.items() if op.startswith("BAR")),
    }


def compile_case(case: str, run: Callable[[], object]) -> list[Launch]:
    """Run `run()` (launch code on meta tensors) under the stand-in driver; one Launch per kernel
    launch it made, in order."""
    drv = _use_stand_in_driver()
    first = len(drv.launched)
    run()
    launches = []
    for index in drv.launched[first:]:
        name, cubin, metadata = drv.binaries[index]
        asm = read_cubin(cubin)
        asm["shared"] = metadata.shared  # what Triton allocates (cuobjdump adds 1 KiB reserved)
        launches.append(Launch(case=case, kernel=name, num_warps=metadata.num_warps, **asm))
    return launches


# ----------------------------------------------------------------------------------------------
# The cases: the benchmark shapes (bench/test_bench_*.py), bf16, through the real launchers
# ----------------------------------------------------------------------------------------------


def _meta(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def cases() -> dict[str, Callable[[], object]]:
    """Case name -> launch code on meta tensors."""
    import importlib

    ce = importlib.import_module("octo_kernels.cross_entropy")
    rn = importlib.import_module("octo_kernels.rmsnorm")
    rp = importlib.import_module("octo_kernels.rope")
    out: dict[str, Callable[[], object]] = {}

    for n, c in ((8192, 768), (65536, 4096)):

        def rms(n=n, c=c):
            x, w = _meta(n, c), _meta(c)
            _y, rstd = rn._fwd_launch(x, w, 1e-6)
            rn._bwd_launch(_meta(n, c), x, w, rstd)

        out[f"rmsnorm {n}x{c}"] = rms

    for b, t, hq, hk, d in ((16, 512, 12, 3, 64), (16, 4096, 32, 8, 128)):

        def rope(b=b, t=t, hq=hq, hk=hk, d=d):
            q = _meta(b, t, hq, d).transpose(1, 2)  # the model's layout
            k = _meta(b, t, hk, d).transpose(1, 2)
            cos = sin = _meta(t, d, dtype=torch.float32)
            rp._rope_launch(q, k, cos, sin, 0, False)
            rp._rope_launch(q, k, cos, sin, 0, True)

        out[f"rope B{b} T{t} H{hq}/{hk} D{d}"] = rope

    for v in (16000, 50257, 50304):

        def xent(v=v):
            logits, labels = _meta(8192, v), _meta(8192, dtype=torch.int64)
            _loss, stats = ce.ce_forward_launch(logits, labels, -100, 0.0)
            ce._bwd_launch(logits, labels, stats, _meta(1, dtype=torch.float32), -100, 0.0)
            scale = _meta(1, dtype=torch.float32)  # the linear CE's forward-with-gradient
            ce.ce_forward_launch(logits, labels, -100, 0.0, grad_scale=scale)

        out[f"cross_entropy 8192x{v}"] = xent
    return out


def report() -> list[Launch]:
    return [launch for name, run in cases().items() for launch in compile_case(name, run)]


def table(launches: list[Launch]) -> str:
    def fmt(d: dict[str, int]) -> str:
        return " ".join(f"{k}x{n}" for k, n in sorted(d.items())) or "-"

    head = "| case | kernel | warps | regs | stack | shared | loads | stores | cp.async | bar |"
    rows = [head, "|" + "---|" * 10]
    for x in launches:
        rows.append(
            f"| {x.case} | {x.kernel} | {x.num_warps} | {x.regs} | {x.stack} | {x.shared} | "
            f"{fmt(x.loads)} | {fmt(x.stores)} | {fmt(x.async_copies)} | {x.barriers} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    launches = report()
    if args.json:
        print(json.dumps([asdict(x) for x in launches], indent=1))
        return
    print(f"Triton {triton.__version__}, torch {torch.__version__}, target sm_{TARGET.arch}")
    print(table(launches))


if __name__ == "__main__":
    main()
