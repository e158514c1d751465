"""A device name -> torch.device, checked before anything is loaded onto it: the one resolver.

    resolve_device(None)      cuda:local_rank when CUDA is available, else cpu
    resolve_device("cpu")     cpu
    resolve_device("cuda")    cuda:local_rank (local_rank: this process's GPU under torchrun)
    resolve_device("cuda:N")  cuda:N, N checked against the GPUs present

Why a resolver of our own: torch's own answers to a bad name are a RuntimeError listing every
device type it knows (torch.device("cuda:abc")), or an AssertionError deep in the first
allocation when CUDA is absent. Here each problem is a DeviceError (a ValueError) that says
which of three it is, so each caller words it for its own interface: the `--device` flag of
`python -m octo.generate`, the `device` key of a training config.
"""

from __future__ import annotations

import torch

UNKNOWN = "unknown"  # not a device name, or a device type other than cpu and cuda
NO_CUDA = "no_cuda"  # cuda asked for, none available
NO_SUCH_GPU = "no_such_gpu"  # cuda:N with N >= the number of GPUs


class DeviceError(ValueError):
    """A device name that cannot be used here. problem: UNKNOWN, NO_CUDA or NO_SUCH_GPU; name:
    the name as given; count: the number of CUDA devices present (0 without CUDA)."""

    def __init__(self, problem: str, name: str, count: int) -> None:
        self.problem, self.name, self.count = problem, name, count
        super().__init__(f"device {name!r}: {problem} (CUDA devices: {count})")


def cuda_count() -> int:
    """CUDA devices present; 0 without CUDA (device_count alone may warn or init a driver)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(name: str | None, *, local_rank: int = 0) -> torch.device:
    """The torch.device `name` stands for (module docstring); DeviceError when it is not one
    this machine has. Nothing is allocated and the current CUDA device is not changed."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:  # torch's text lists every device type it knows
        raise DeviceError(UNKNOWN, name, cuda_count()) from None
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(UNKNOWN, name, cuda_count())
    if device.type == "cpu":
        return device
    count = cuda_count()
    if count == 0:
        raise DeviceError(NO_CUDA, name, 0)
    index = local_rank if device.index is None else device.index
    if index >= count:
        raise DeviceError(NO_SUCH_GPU, name, count)
    return torch.device("cuda", index)
