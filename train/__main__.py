"""`python -m train --config train/config.json [--model-config m.json] [--set key=value ...]`

Parse, validate (a bad key or value: one line, exit 2, before any data or model is loaded), run.
"""

from __future__ import annotations

import argparse
import atexit
import os
import signal
import sys
from pathlib import Path
from typing import NoReturn

DEFAULT_CONFIG = Path(__file__).resolve().parent / "config.json"


def main(argv: list[str] | None = None) -> int:
    from train.config import add_set_argument  # light: no torch
    from train.config_docs import help_epilog

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
        from train.config import ConfigError, TrainConfig, load_model_config

        try:
            cfg = TrainConfig.load(args.config, args.set)
            if args.model_config is not None:
                cfg.model_config = args.model_config
            model_fields = load_model_config(cfg)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

        from train.run import run  # imports torch: seconds, where a Ctrl-C often lands
    except KeyboardInterrupt:  # run() reports its own
        print("interrupted before training started; nothing was saved", file=sys.stderr)
        return 130
    return run(cfg, model_fields)


def exit_process(code: int) -> NoReturn:
    """End the process with `code`. A process that joined a process group (torchrun) runs its
    atexit handlers, flushes stdout/stderr and leaves through os._exit, skipping the interpreter's
    finalization: a Gloo worker thread may still be releasing the last collective's tensors then
    (after the work completed and the caller moved on), the release needs the GIL, a thread that
    asks for it during finalization is ended, and the C++ runtime aborts the process with
    "terminate called without an active exception" after a run that succeeded
    (pytorch/pytorch#179291; seen here on CPU under load, core dump in
    c10d::ProcessGroupGloo::runLoop -> ~AsyncBroadcastWork). Gloo is used on GPUs too, for the
    host-side flags."""
    distributed = sys.modules.get("train.distributed")  # not imported: no group, torch unloaded
    if distributed is None or not distributed.joined_group():
        sys.exit(code)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    code = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # it is over: a late Ctrl-C prints no traceback
    exit_process(code)
