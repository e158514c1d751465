"""Where and how this process computes, decided once: `Runtime.build` resolves the device, joins
the process group, sets the kernel backend, checks the compile mode and optimizer for them, and
picks the precision; the result (a frozen Runtime) is passed down to the Trainer, the data and
the metrics, and nothing below re-derives any of it from the config.

run() builds it once (train/run.py); a Trainer built directly (tests, bench) builds its own.
Also here: `check_memory` (does the run fit the device) and `seed_everything`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import random
from collections.abc import Callable

import numpy as np
import torch

from octo.config import OctoConfig
from octo.device import NO_CUDA, NO_SUCH_GPU, DeviceError
from octo.device import resolve_device as device_for_name
from octo.memory import TooLargeError, check_fits, format_bytes, kv_cache_bytes, training_bytes
from octo_kernels import backend
from train.config import ConfigError, TrainConfig
from train.distributed import DistEnv, init_distributed
from train.muon import check_optimizer


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux; platform's answer elsewhere): a CPU
    number must say which CPU, and platform.processor() says only "x86_64"."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def resolve_device(cfg: TrainConfig) -> torch.device:
    """cfg.device -> a torch.device, by octo.device's resolver (the one copy) in the words of the
    config key. auto: CUDA when available (cuda:LOCAL_RANK under torchrun), else CPU. A string
    torch cannot parse (cuda:abc), CUDA asked for on a machine without it, and a GPU number the
    machine does not have are ConfigErrors. A CUDA device becomes the current one, with TF32."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    try:
        device = device_for_name(
            None if cfg.device == "auto" else cfg.device, local_rank=local_rank
        )
    except DeviceError as e:
        if e.problem == NO_CUDA:
            raise ConfigError(f"device {cfg.device!r} asked for, but CUDA is not available; "
                              "set device to auto or cpu") from None  # fmt: skip
        if e.problem == NO_SUCH_GPU and cfg.device in ("auto", "cuda"):  # GPU LOCAL_RANK
            raise ConfigError(f"config key 'device' is {cfg.device!r}: this process is LOCAL_RANK "
                              f"{local_rank} under torchrun, but this machine has {e.count} CUDA "
                              f"device(s), one per process; start at most {e.count} processes "
                              f"on it (torchrun --nproc_per_node {e.count})") from None  # fmt: skip
        if e.problem == NO_SUCH_GPU:
            raise ConfigError(f"config key 'device' is {cfg.device!r}, but this machine has "
                              f"{e.count} CUDA device(s), cuda:0 to cuda:{e.count - 1}; use auto "
                              "or one of those") from None  # fmt: skip
        raise ConfigError(f"config key 'device' is {cfg.device!r}, which is not a device; use "
                          "auto, cpu, cuda or cuda:N (N a GPU number)") from None  # fmt: skip
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls (outside autocast) on TF32
        torch.backends.cudnn.allow_tf32 = True
    return device


@dataclasses.dataclass(frozen=True)
class Precision:
    """How the step computes: `name` is bf16 | fp16 | fp32. Weights and optimizer state stay fp32
    (master weights); bf16/fp16 mean autocast of the matmuls; fp16 also needs a GradScaler."""

    name: str
    device_type: str

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward's context: autocast to bf16/fp16, or nothing for fp32."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    def make_scaler(self) -> torch.amp.GradScaler | None:
        """fp16's gradients underflow without loss scaling; bf16 and fp32 need none."""
        return torch.amp.GradScaler(self.device_type) if self.name == "fp16" else None

    def describe(self) -> str:
        return {
            "bf16": "bf16 autocast, fp32 master weights",
            "fp16": "fp16 autocast + GradScaler, fp32 master weights",
            "fp32": "fp32",
        }[self.name]


def resolve_precision(cfg: TrainConfig, device: torch.device) -> Precision:
    """cfg.precision wins when set; auto means use_mixed_precision -> bf16 on a GPU that has it,
    else fp16 (+ GradScaler); fp32 on CPU unless precision asks otherwise (CPU autocast is slow)."""
    name = cfg.precision
    if name == "auto":
        if not cfg.use_mixed_precision or device.type != "cuda":
            name = "fp32"
        else:
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("precision 'bf16' asked for, but this GPU has no bf16; use fp16")
    return Precision(name, device.type)


def effective_compile(cfg: TrainConfig, device: torch.device) -> str:
    """cfg.compile with auto resolved: on for CUDA (where it pays), off on CPU. The result is
    off | on | cudagraphs | graph (the last two: on, plus CUDA graphs)."""
    if cfg.compile == "auto":
        return "on" if device.type == "cuda" else "off"
    return cfg.compile


def check_compile_mode(
    cfg: TrainConfig, distributed: bool, device: torch.device | None = None
) -> None:
    """compile=cudagraphs and compile=graph are for one process on a CUDA device: refused
    (ConfigError) under torchrun (CUDA graphs under DDP/FSDP2 hooks were never tried) and on any
    other `device` (there is nothing to capture: cudagraphs would only compile, for minutes),
    before any data is built. device None: not checked (the Trainer's CPU stand-in for tests)."""
    if cfg.compile not in ("cudagraphs", "graph"):
        return
    if distributed:
        raise ConfigError(f"compile {cfg.compile!r} runs in one process only; use compile on "
                          "under torchrun")  # fmt: skip
    if device is not None and device.type != "cuda":
        raise ConfigError(f"compile {cfg.compile!r} captures CUDA graphs and needs a CUDA device, "
                          f"but the device is {device}; use compile on or off here")  # fmt: skip


def set_kernel_backend(cfg: TrainConfig, device: torch.device | None = None) -> str:
    """cfg.kernels -> OCTO_KERNELS; returns the backend then in force (auto | triton | torch).
    auto leaves the environment alone, so OCTO_KERNELS set in the shell still chooses;
    triton/torch override it. Triton asked for (by either) where it cannot run -- Triton missing,
    or a CPU `device` without the interpreter -- is a ConfigError now, not a RuntimeError at the
    first forward pass. device None: resolve_device(cfg)."""
    if cfg.kernels != "auto":
        os.environ["OCTO_KERNELS"] = cfg.kernels
    try:
        name = backend.requested_backend()
    except ValueError as e:  # OCTO_KERNELS in the shell names no backend
        raise ConfigError(f"{e}; or set config key kernels") from None
    if name != "triton":
        return name
    source = "config key kernels" if cfg.kernels == "triton" else "OCTO_KERNELS"
    if not backend.triton_available():
        raise ConfigError(f"kernels 'triton' ({source}) asked for, but Triton does not import; "
                          "set kernels=auto or torch, or install triton")  # fmt: skip
    device = device if device is not None else resolve_device(cfg)
    if device.type == "cpu" and not backend.interpreting():
        raise ConfigError(f"kernels 'triton' ({source}) on the CPU needs Triton's interpreter; "
                          "set kernels=auto (the PyTorch reference on CPU), or TRITON_INTERPRET=1 "
                          "in the environment (slow)")  # fmt: skip
    return name


@dataclasses.dataclass(frozen=True)
class Runtime:
    """Where and how this process computes, decided once (Runtime.build) and passed down; nothing
    below re-derives it from the config. compile: the effective mode, off | on | cudagraphs |
    graph (effective_compile); kernels: the backend in force, auto | triton | torch."""

    device: torch.device
    env: DistEnv
    precision: Precision
    compile: str
    kernels: str

    @classmethod
    def build(
        cls,
        cfg: TrainConfig,
        *,
        device: torch.device | None = None,
        env: DistEnv | None = None,
        graph_stand_in: bool = False,
    ) -> Runtime:
        """Every start-up decision in its order, each bad choice a ConfigError (one line) before
        any data is built. device None: resolve_device(cfg); env None: init_distributed(device).
        graph_stand_in (tests only): compile=graph or cudagraphs allowed on a CPU (graph: the
        capture replaced by a direct call; cudagraphs: compiled code, no graphs on CPU tensors)."""
        device = device if device is not None else resolve_device(cfg)
        env = env if env is not None else init_distributed(device)
        kernels = set_kernel_backend(cfg, device)
        check_compile_mode(cfg, env.enabled, None if graph_stand_in else device)
        check_optimizer(cfg, env.enabled)
        precision = resolve_precision(cfg, device)
        return cls(device, env, precision, effective_compile(cfg, device), kernels)

    @property
    def pin_memory(self) -> bool:
        """Host batches in page-locked memory: only a CUDA device copies from them faster."""
        return self.device.type == "cuda"

    @property
    def cuda_graphs(self) -> bool:
        """compile=cudagraphs: each micro-batch is a new graph step (Trainer._new_graph_step)."""
        return self.compile == "cudagraphs"

    @property
    def static_grads(self) -> bool:
        """Gradients kept in buffers of their own, zeroed, never freed: a graph replay overwrites
        its outputs, so a gradient must never be one (see the Trainer)."""
        return self.compile in ("cudagraphs", "graph")

    def compiled(self, fn: Callable) -> Callable:
        """The only torch.compile of the project's step: `fn` is the forward+loss function,
        compiled whole (fullgraph=True: the model and its kernels are written to trace without a
        break, so a break is a bug to see, not to hide). The backward is compiled by
        AOTAutograd with it. compile=cudagraphs adds mode="reduce-overhead": the step's kernels
        replay as CUDA graphs (no per-kernel launch cost; CPU tensors run without graphs). The
        Trainer then marks each micro-batch as a new graph step and keeps its gradients in
        buffers of its own; bench/NOTES.md has what was measured. compile=graph compiles as
        on: the Trainer captures the compiled forward + loss + backward itself
        (train/cudagraph.py)."""
        if self.compile == "off":
            return fn
        if self.compile == "cudagraphs":
            return torch.compile(fn, fullgraph=True, mode="reduce-overhead")
        return torch.compile(fn, fullgraph=True)

    def compile_phrase(self) -> str:
        """The start line's words for the compile mode."""
        phrases = {
            "off": "off",
            "cudagraphs": "on + CUDA graphs",
            "graph": "on + each micro-batch captured as one CUDA graph",
        }
        return phrases.get(self.compile, "on")


def check_memory(
    cfg: TrainConfig, model_cfg: OctoConfig, rt: Runtime, sample_shape: tuple[int, int]
) -> None:
    """ConfigError (one line: the estimate and what is free) when training this model and
    sampling from it at the end cannot fit on rt.device; from the configs alone (octo.memory), so
    an impossible size is refused in a moment, before the data or the model are built.

    Counted: fp32 weights, gradients and AdamW state (FSDP: this rank's share), and the KV cache
    of the end-of-run samples, sample_shape = (samples, prompt tokens) with sample_max_new_tokens
    more (at most max_position_embeddings), in the autocast dtype. Several processes on one
    CPU share its memory. Activations are not counted (their own OOM is one line too)."""
    device, world_size = rt.device, rt.env.world_size
    fsdp = world_size > 1 and cfg.parallelism == "fsdp"
    train = training_bytes(model_cfg, shards=world_size if fsdp else 1)
    samples, prompt = sample_shape
    positions = min(prompt + cfg.sample_max_new_tokens, model_cfg.max_position_embeddings)
    dtype = rt.precision.autocast_dtype or torch.float32
    kv = kv_cache_bytes(model_cfg, samples, positions, dtype)
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device.type == "cpu" else 1
    what = (
        f"training this {model_cfg.num_parameters():,}-parameter model ({format_bytes(train)} of "
        f"weights, gradients and AdamW state) and its {samples} samples at the end (KV cache of "
        f"{positions:,} positions, {format_bytes(kv)})"
    )
    if processes > 1:
        what += f", in each of {processes} processes on this machine,"
    fix = (
        "lower sample_max_new_tokens (or max_position_embeddings in the model config)"
        if kv > train
        else "make the model smaller (hidden_size, intermediate_size, num_hidden_layers or "
        "vocab_size in the model config)"
    )
    try:
        check_fits((train + kv) * processes, device, what, fix)
    except TooLargeError as e:
        raise ConfigError(str(e)) from None


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch (CPU and every CUDA device) from one seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
