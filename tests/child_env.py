"""The environment of a test's child process (python -m train, torchrun, python -c ...)."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child_env(drop: tuple[str, ...] = (), **extra: str) -> dict[str, str]:
    """This process's environment without the `drop` keys, plus `extra`, with this checkout on
    PYTHONPATH. Why: a child started in another directory imports whatever `octo` / `train` is
    installed, e.g. an editable install of another checkout, not the code under test."""
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "PYTHONPATH": str(ROOT), **extra}
