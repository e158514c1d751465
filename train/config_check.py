"""What a TrainConfig accepts: its keys, their types, their values (ranges, choices).

train/config.py says what the keys are (each with its default and meaning) and how a config is
read; this module says which keys and values it takes, so each file reads as one thing. Building a
TrainConfig runs typed_values (it returns the float keys given as ints, as floats, which
TrainConfig.validate stores) and then check_values; TrainConfig.load runs check_keys on the file's
and --set's keys first. Each failure is a ConfigError, one line naming the key, the value and the
fix. `cfg` below is a TrainConfig, not annotated as one: train/config.py imports this module, and
importing it back would be a cycle. Torch-free until the last check (max_shard_size imports octo),
so a bad key or value is reported before torch is imported.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from typing import Any

from train.errors import ConfigError
from train.trackers import report_to_names

# Keys that name files or folders; an empty string is refused rather than read as "here".
PATH_KEYS = ("dataset_name", "tokenizer_name", "checkpoint_dir", "resume_from", "model_config",
             "init_from", "data_cache_dir", "log_dir")  # fmt: skip
NULLABLE_PATH_KEYS = ("resume_from", "model_config", "init_from")

POSITIVE_INTS = (
    "block_size", "batch_size", "gradient_accumulation_steps", "num_epochs",
    "log_interval_steps", "eval_interval_steps", "save_interval_steps", "eval_max_batches",
    "keep_last_checkpoints", "sample_max_new_tokens", "max_consecutive_nonfinite",
)  # fmt: skip
UNIT_INTERVAL = ("min_lr_ratio", "eval_holdout_fraction", "adam_beta1", "adam_beta2",
                 "muon_momentum")  # fmt: skip
CHOICES = {
    "lr_schedule": ("cosine", "linear", "constant"),
    "precision": ("auto", "bf16", "fp16", "fp32"),
    "compile": ("auto", "on", "off", "cudagraphs", "graph"),
    "kernels": ("auto", "triton", "torch"),
    "parallelism": ("ddp", "fsdp"),
    "optimizer": ("adamw", "muon"),
}


def check_keys(cls: type, d: dict[str, Any], source: str) -> None:
    """ConfigError for the first key of d that is not a field of the dataclass cls, naming the
    nearest field (source: where d came from, the config file or --set)."""
    names = [f.name for f in dataclasses.fields(cls)]
    for key in d:
        if key not in names:
            near = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
            hint = f"did you mean {near[0]!r}?" if near else "see the README for the valid keys"
            raise ConfigError(f"{source}: unknown key {key!r}; {hint}")


def typed_values(cfg: Any) -> dict[str, float]:
    """Check every key's value against its annotation (int also for float; None for Optional).
    Returns the float keys given as ints, as floats: JSON's 0 is an int, and torch's AdamW refuses
    betas (0, 0.95), an int beside a float. An int too large for a float becomes inf, which
    check_values then refuses."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        _check_type(f.name, getattr(cfg, f.name), hints[f.name])
    floats = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, int) and not isinstance(value, bool) and _holds_float(hints[f.name]):
            floats[f.name] = float(value) if abs(value) < 2**1000 else math.inf
    return floats


def check_values(cfg: Any) -> None:
    """Finite numbers, non-empty paths, ranges, choices, then max_shard_size; the first failure
    raises (in this order, so one config gets one message whatever the run)."""
    # JSON and --set accept NaN and Infinity; no key means anything by them (an infinite
    # learning rate trains NaN weights, a NaN max_grad_norm silently turns clipping off).
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key {f.name!r} must be a finite number, got {value}")
    for name in PATH_KEYS:  # "" would silently mean the current folder
        if getattr(cfg, name) == "":
            none = " (or null for none)" if name in NULLABLE_PATH_KEYS else ""
            raise ConfigError(f"config key {name!r} is an empty string; give a path{none}")
    if cfg.init_from is not None and cfg.resume_from is not None:
        raise ConfigError(
            "config keys 'init_from' and 'resume_from' are both set: init_from starts a fresh "
            "run from trained weights, resume_from continues a run; set one of them to null"
        )
    _check_ranges(cfg)
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            value, options = getattr(cfg, name), ", ".join(allowed)
            raise ConfigError(f"config key {name!r} is {value!r}; choose one of {options}")
    try:
        report_to_names(cfg.report_to)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.device not in ("auto", "cpu", "cuda") and not cfg.device.startswith("cuda:"):
        raise ConfigError(f"config key 'device' is {cfg.device!r}; use auto, cpu, cuda or cuda:N")
    # Parsed here, not at the first checkpoint save (possibly hours in). Last, because it
    # imports octo (torch): a config failing a check above stays a fast failure.
    from octo.files import parse_size  # lazy: octo imports torch (see above)

    try:
        parse_size(cfg.max_shard_size)
    except ValueError as e:
        raise ConfigError(f"config key {e}") from None


def _check_ranges(cfg: Any) -> None:
    """The numeric keys' ranges: the seed torch accepts, counts, rates, fractions."""
    if not -(2**63) <= cfg.seed < 2**64:  # what torch.manual_seed accepts
        raise ConfigError(f"config key 'seed' must be in [-2**63, 2**64), got {cfg.seed}")
    if cfg.block_size < 2:  # a block is inputs and their next tokens: one token predicts none
        raise ConfigError(
            f"config key 'block_size' must be at least 2 (tokens per sequence, each predicting "
            f"the next), got {cfg.block_size}"
        )
    for name in POSITIVE_INTS:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"config key {name!r} must be positive, got {getattr(cfg, name)}")
    if cfg.max_steps is not None and cfg.max_steps <= 0:
        raise ConfigError(f"config key 'max_steps' must be positive or null, got {cfg.max_steps}")
    for name in ("warmup_steps", "num_workers", "buffer_size"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"config key {name!r} must be >= 0, got {getattr(cfg, name)}")
    for name in ("learning_rate", "muon_learning_rate", "muon_adamw_lr_scale"):
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"config key {name!r} must be positive, got {getattr(cfg, name)}")
    for name in ("weight_decay", "max_grad_norm", "muon_weight_decay"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"config key {name!r} must be >= 0, got {getattr(cfg, name)}")
    for name in UNIT_INTERVAL:
        if not 0 <= getattr(cfg, name) < 1:
            raise ConfigError(f"config key {name!r} must be in [0, 1), got {getattr(cfg, name)}")
    if not cfg.adam_eps > 0:
        raise ConfigError(f"config key 'adam_eps' must be positive, got {cfg.adam_eps}")


def _check_type(name: str, value: Any, hint: Any) -> None:
    """Accept value when it matches the annotation (int also for float; None for Optional)."""
    args = typing.get_args(hint) or (hint,)
    ok = False
    for t in args:
        if t is type(None):
            ok |= value is None
        elif t is float:
            ok |= isinstance(value, (int, float)) and not isinstance(value, bool)
        elif t is int:
            ok |= isinstance(value, int) and not isinstance(value, bool)
        else:
            ok |= isinstance(value, typing.get_origin(t) or t)  # dict[str, Any] -> dict
    if not ok:
        want = " or ".join(
            "null" if t is type(None) else (typing.get_origin(t) or t).__name__ for t in args
        )
        raise ConfigError(f"config key {name!r} must be {want}, got {value!r}")


def _holds_float(hint: Any) -> bool:
    """True for a field typed float or float | None."""
    return hint is float or float in typing.get_args(hint)
