"""`python -m train --config train/config.json [--model-config m.json] [--set key=value ...]`

Parse, validate (a bad key or value: one line, exit 2, before any data or model is loaded), run.
"""

from __future__ import annotations

import argparse
import atexit
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

# Light (no torch, tests/test_config.py checks): main()'s stop-signal handlers are in place
# before the seconds of heavy imports (train.model_config, train.run), imported lazily below.
from train.config import ConfigError, TrainConfig, add_set_argument
from train.config_docs import help_epilog
from train.signals import ignore_stop_signals, raise_if_interrupted, stop_signals_interrupt

DEFAULT_CONFIG = Path(__file__).resolve().parent / "config.json"


def main(argv: list[str] | None = None) -> int:
    """The run's exit code (see train/run.py). From main()'s first line, SIGINT and SIGTERM stop
    the start-up (torch and transformers take seconds to import) with one line and 130."""
    with stop_signals_interrupt():
        started = False
        try:
            parsed = _parse(argv)
            if isinstance(parsed, int):
                return parsed
            from train.run import run  # imports torch: seconds, where a Ctrl-C often lands

            raise_if_interrupted()  # one that an import swallowed ("Exception ignored in ...")
            started = True
            return run(*parsed)
        except KeyboardInterrupt:  # run() reports its own; this is one in the instant around it
            if started:
                print("interrupted while the run was starting or ending; the lines above say "
                      "what it saved", file=sys.stderr)  # fmt: skip
            else:
                print("interrupted before training started; nothing was saved", file=sys.stderr)
            return 130


def _parse(argv: list[str] | None) -> tuple[Any, dict[str, Any]] | int:
    """(TrainConfig, model fields) from the command line, or 2 after a ConfigError's line."""
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description="Train an Octo (Llama-architecture) language model.",
        epilog=help_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        default=str(DEFAULT_CONFIG),
        help="training config JSON (default: train/config.json, the seed's)",
    )
    parser.add_argument(
        "--model-config",
        default=None,
        help="model config JSON or preset name (seed, tiny); overrides the config's model_config",
    )
    add_set_argument(parser)
    args = parser.parse_args(argv)
    try:
        cfg = TrainConfig.load(args.config, args.set, args.model_config)
        from train.model_config import load_model_config  # octo, torch: once the config is valid

        return cfg, load_model_config(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def entry(run_main: Callable[[], int] = main) -> NoReturn:
    """The process of `python -m train` (and of train/train.py, and, with its own main, of
    `python -m train.prepare`): main(), then exit_process."""
    try:
        code = run_main()
    except KeyboardInterrupt:  # in the instant after main()'s handlers are gone
        code = 130
    exit_process(code)


def exit_process(code: int) -> NoReturn:
    """End the process with `code`. A process that joined a process group (torchrun) runs its
    atexit handlers, flushes stdout/stderr and leaves through os._exit, skipping the interpreter's
    finalization: a Gloo worker thread may still be releasing the last collective's tensors then
    (after the work completed and the caller moved on), the release needs the GIL, a thread that
    asks for it during finalization is ended, and the C++ runtime aborts the process with
    "terminate called without an active exception" after a run that succeeded
    (pytorch/pytorch#179291; seen here on CPU under load, core dump in
    c10d::ProcessGroupGloo::runLoop -> ~AsyncBroadcastWork). Gloo is used on GPUs too, for the
    host-side flags.
    From here on SIGINT and SIGTERM are ignored: the code is decided, and a late Ctrl-C must
    neither print a traceback nor change it."""
    ignore_stop_signals()
    distributed = sys.modules.get("train.distributed")  # not imported: no group, torch unloaded
    if distributed is None or not distributed.joined_group():
        sys.exit(code)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
