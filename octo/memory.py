"""Will it fit? Bytes a model needs on a device, estimated from its config before anything is
allocated, against the bytes the device has free.

Why: a config (or a checkpoint's config.json) can declare any size. Building such a model fails
late and badly: an allocator traceback, or, on the meta device or with many small layers,
minutes of building modules while the memory fills. The arithmetic here costs microseconds, so
every entry point (training, from_pretrained, generate) checks first and refuses in one line.

The estimates are lower bounds: parameters and what scales with them (gradients, AdamW's moments,
a KV cache), not activations or the allocator's slack. So a refusal is certain, and a pass is no
promise (a run can still run out of memory on activations; training reports that in one line).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from octo.config import OctoConfig

# fp32 master weights + fp32 gradients + AdamW's two fp32 moments, per parameter. The precision
# setting (bf16/fp16 autocast) changes the matmuls, not these: they stay fp32.
TRAIN_BYTES_PER_PARAM = 4 + 4 + 8


class TooLargeError(ValueError):
    """What a config asks for cannot fit on the device; the message is one line with both sizes."""


def format_bytes(n: float) -> str:
    """1234567890 -> '1.23 GB' (decimal units, as disks and `free -h --si` print them)."""
    for unit, size in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            value = n / size
            return f"{value:.3g} {unit}" if value < 1000 else f"{value:,.0f} {unit}"
    return f"{int(n)} B"


def weights_bytes(cfg: OctoConfig, dtype: torch.dtype = torch.float32) -> int:
    """The parameters alone, in `dtype` (what from_pretrained and generation hold)."""
    return cfg.num_parameters() * dtype.itemsize


def training_bytes(cfg: OctoConfig, shards: int = 1) -> int:
    """Weights, gradients and AdamW state of one training process. shards > 1: FSDP's share of
    `shards` processes, but at least the whole fp32 model, which every rank builds before it is
    sharded."""
    n = cfg.num_parameters()
    return max(4 * n, -(-TRAIN_BYTES_PER_PARAM * n // shards))


def kv_cache_bytes(cfg: OctoConfig, batch: int, positions: int, dtype: torch.dtype) -> int:
    """octo.model.KVCache for `batch` rows of `positions` positions: keys and values, per layer
    (B, K, P, D) each."""
    per_layer = 2 * batch * cfg.num_key_value_heads * positions * cfg.head_dim
    return cfg.num_hidden_layers * per_layer * dtype.itemsize


def available_bytes(device: torch.device | str) -> int | None:
    """Bytes free for new tensors on `device`, or None when it cannot be told.

    cpu: the kernel's MemAvailable (free memory plus what it can reclaim; /proc/meminfo), lowered
    to the cgroup's limit minus its usage where a container sets one (cgroup v2 memory.max);
    elsewhere os.sysconf's available pages. cuda: torch.cuda.mem_get_info's free bytes (other
    processes' use included)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    found = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    if found is None:
        try:
            found = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # a name this platform lacks (macOS)
            return None
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            used = int((cgroup / "memory.current").read_text())
            found = min(found, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return found


def check_fits(need: int, device: torch.device | str, what: str, fix: str) -> None:
    """TooLargeError when `need` bytes exceed what `device` has free; nothing when they fit or
    the free memory cannot be told. what: what needs them ("the model ... for training");
    fix: what to change (names keys or flags)."""
    device = torch.device(device)
    have = available_bytes(device)
    if have is None or need <= have:
        return
    raise TooLargeError(
        f"{what} needs about {format_bytes(need)} on {device} but {format_bytes(have)} is "
        f"available; {fix}"
    )
