"""Environment check: can this machine run Octo, and how fast a path will it take?

    python check.py

Prints torch / CUDA / GPU / bf16 / Triton facts, which kernel implementation the model will use,
and the versions of the libraries Octo reads and writes checkpoints and data with. Exits 1 with one
line naming the package when something required (torch, safetensors, tokenizers, transformers, or
the project itself) does not import. No GPU or no Triton is not an error: Octo then runs the
pure-PyTorch reference ops, and this says so.
"""

from __future__ import annotations

import importlib
import sys

REQUIRED = ("torch", "safetensors", "tokenizers", "transformers")
OPTIONAL = {"datasets": "needed only to stream Hugging Face datasets"}


def _version(name: str) -> str:
    module = importlib.import_module(name)
    return getattr(module, "__version__", "unknown version")


def main() -> int:
    versions = {}
    for name in REQUIRED:
        try:
            versions[name] = _version(name)
        except Exception as e:  # ImportError, or a broken install failing at import
            print(
                f"check.py: required package {name!r} does not import ({type(e).__name__}: {e}); "
                'install the project with: pip install -e ".[dev]"',
                file=sys.stderr,
            )
            return 1
    try:
        import octo_kernels
    except Exception as e:
        print(
            f"check.py: Octo's octo_kernels package does not import ({type(e).__name__}: {e}); run "
            'this from the repository root after: pip install -e ".[dev]"',
            file=sys.stderr,
        )
        return 1
    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    print(f"python        {sys.version.split()[0]}")
    print(f"torch         {versions['torch']}")
    print(f"CUDA          {torch.version.cuda if cuda else 'not available (CPU only)'}")
    if cuda:
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            print(f"GPU {i}         {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})")
        print(f"bf16          {'supported' if torch.cuda.is_bf16_supported() else 'NOT supported'}")
    else:
        print("GPU           none")
        print("bf16          n/a (no CUDA GPU)")
    triton = "not installed" if not octo_kernels.triton_available() else _version("triton")
    print(f"triton        {triton}")
    print(f"kernels       {octo_kernels.describe(device)} (on {device})")
    for name in ("transformers", "safetensors", "tokenizers"):
        print(f"{name:<14}{versions[name]}")
    for name, why in OPTIONAL.items():
        try:
            version = _version(name)
        except Exception:
            version = f"not installed ({why})"
        print(f"{name:<14}{version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
