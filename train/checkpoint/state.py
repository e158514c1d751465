"""trainer_state.json: what a checkpoint holds beside the weights and the optimizer, and the check
of every field the trainer reads, before any of it is used (and of optimizer.json's form).

    step             optimizer steps done; must equal the checkpoint's own (its folder name
                     checkpoint_step_N and its completion marker)
    epoch, tokens_seen, nonfinite_skips          counters (ints >= 0)
    batch_size, learning_rate, world_size        the settings it was trained with (the resume
                                                 warnings and the per-rank states compare them)
    scheduler        the LR schedule's settings (a record: the schedule is rebuilt from the config)
    scaler           GradScaler.state_dict() under fp16, else null
    data             the train data's position (train/data/pretok.py or train/data/stream.py
                     state_dict: "mode" pretok or stream), or null
    rng              capture_rng_state(): python, numpy, torch CPU and CUDA generator states
    ranks            under torchrun, each rank's {"data", "rng"} (train/checkpoint/dist.py)

Why check all of it here: a checkpoint whose completion marker was recomputed over edited files
(a hand edit, a bug, another tool) passes every checksum, and a wrong value would otherwise end
as a traceback deep in a library (`"rng": {}`: KeyError 'python') or, worse, be used silently (a
step that is not the folder's resumes at the wrong point of the schedule and data). Each problem
is one CheckpointError naming the file and the field. What the data modules then compare with
the run's config (dataset, seed, block size, ...) they report themselves.

Here too: read_json / write_json, the checkpoint's JSON files with their errors as CheckpointError.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from octo import files
from train.errors import CheckpointError

__all__ = [
    "capture_rng_state",
    "check_optimizer_meta",
    "check_trainer_state",
    "read_json",
    "restore_rng_state",
    "write_json",
]

log = logging.getLogger("train.checkpoint")


def write_json(path: Path, obj: Any) -> None:
    """Write JSON durably (octo.files.write_json). A value JSON cannot hold (a tensor, a set)
    raises CheckpointError naming the file, before anything is written."""
    try:
        files.write_json(path, obj)
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"{path.name}: {e}; pass plain JSON values (numbers, strings, lists, dicts) in it"
        ) from None


def read_json(path: Path) -> Any:
    """Parse a JSON file; a missing or malformed file is a CheckpointError naming it."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing (corrupt checkpoint)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}) (corrupt checkpoint)") from None


class _Bad(ValueError):
    """A field that is not what it must be: (its dotted name, what is wrong)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(field, problem)
        self.field, self.problem = field, problem


# ----- RNG ----------------------------------------------------------------------------------------


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def _unb64(s: Any, field: str) -> torch.Tensor:
    try:
        raw = base64.b64decode(s, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise _Bad(field, f"is {s!r:.40} (not base64 text)") from None
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0)


def capture_rng_state() -> dict:
    """Every RNG a training step may draw from, as JSON (byte states base64-encoded, lossless):
    python `random`, numpy's global generator, torch CPU, and torch CUDA (one per device, when
    CUDA is in use)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return {
        "python": [version, list(internal), gauss],
        "numpy": [
            kind,
            base64.b64encode(keys.astype("<u4").tobytes()).decode(),
            pos,
            has_gauss,
            cached,
        ],  # fmt: skip
        "torch": _b64(torch.get_rng_state()),
        "cuda": cuda,
    }


def _entry(d: Any, key: str, field: str) -> Any:
    if not isinstance(d, dict):
        raise _Bad(field, f"is {d!r:.40}, not an object")
    if key not in d:
        raise _Bad(f"{field}.{key}", "is missing")
    return d[key]


def _parse_rng(state: Any, field: str = "rng") -> tuple:
    """capture_rng_state's JSON -> (python state, numpy state, torch CPU state, [CUDA states]),
    each proven by setting it into a private generator of its kind (the global ones are not
    touched). _Bad naming the first entry that is not a state of its generator."""
    entries = [_entry(state, k, field) for k in ("python", "numpy", "torch")]
    py, npy, cpu = entries
    try:
        version, internal, gauss = py
        py_state = (version, tuple(internal), gauss)
        random.Random().setstate(py_state)
    except (TypeError, ValueError, OverflowError) as e:
        raise _Bad(f"{field}.python", f"is not a Python random state ({e})") from None
    try:
        kind, keys, pos, has_gauss, cached = npy
        keys = np.frombuffer(base64.b64decode(keys, validate=True), dtype="<u4")
        np_state = (kind, keys, pos, has_gauss, cached)
        np.random.RandomState().set_state(np_state)
    except (TypeError, ValueError, IndexError, binascii.Error) as e:
        raise _Bad(f"{field}.numpy", f"is not a NumPy random state ({e})") from None
    cpu_state = _unb64(cpu, f"{field}.torch")
    try:
        torch.Generator().set_state(cpu_state)
    except RuntimeError as e:
        raise _Bad(f"{field}.torch", f"is not a torch CPU generator state ({e})") from None
    cuda = state.get("cuda")
    if cuda is not None and not isinstance(cuda, list):
        raise _Bad(f"{field}.cuda", f"is {cuda!r:.40}, not a list or null")
    cuda_states = [_unb64(s, f"{field}.cuda[{i}]") for i, s in enumerate(cuda or [])]
    return py_state, np_state, cpu_state, cuda_states


def restore_rng_state(state: dict) -> None:
    """Inverse of capture_rng_state. CUDA states are restored for the devices both sides have.
    A state that is not one (check_trainer_state catches it first) is a CheckpointError."""
    try:
        py_state, np_state, cpu_state, cuda_states = _parse_rng(state)
    except _Bad as e:
        raise CheckpointError(f"trainer state: field {e.field!r} {e.problem}") from None
    random.setstate(py_state)
    np.random.set_state(np_state)
    torch.set_rng_state(cpu_state)
    if cuda_states and torch.cuda.is_available():
        n = min(len(cuda_states), torch.cuda.device_count())
        if n < len(cuda_states):
            log.warning("checkpoint has %d CUDA RNG states, %d GPUs here", len(cuda_states), n)
        torch.cuda.set_rng_state_all(cuda_states[:n])


# ----- the fields ---------------------------------------------------------------------------------


def _int(value: Any, field: str, low: int = 0) -> int:
    if type(value) is not int or value < low:
        raise _Bad(field, f"is {value!r:.60}, not int >= {low}")
    return value


def _number(value: Any, field: str) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):
        raise _Bad(field, f"is {value!r:.60}, not a finite number")
    return value


def _obj(value: Any, field: str, null: bool = True) -> dict | None:
    if (value is None and null) or isinstance(value, dict):
        return value
    raise _Bad(field, f"is {value!r:.60}, not an object" + (" or null" if null else ""))


def _check_scaler(scaler: dict, field: str) -> None:
    """GradScaler.state_dict(): the five entries its load_state_dict reads ({} = disabled)."""
    if not scaler:
        return
    if _number(_entry(scaler, "scale", field), f"{field}.scale") <= 0:
        raise _Bad(f"{field}.scale", f"is {scaler['scale']}, not > 0")
    for key in ("growth_factor", "backoff_factor"):
        _number(_entry(scaler, key, field), f"{field}.{key}")
    _int(_entry(scaler, "growth_interval", field), f"{field}.growth_interval", 1)
    _int(_entry(scaler, "_growth_tracker", field), f"{field}._growth_tracker")


_STREAM_POSITION = ("window", "doc", "offset", "emitted")


def _check_data(data: dict, field: str, world_size: int) -> None:
    """A data position's shape (train/data/pretok.py, train/data/stream.py state_dict): the
    entries load_state_dict reads, with the types it can use. Another mode, or none, is the
    data object's own to check (a pre-tokenized or streamed one refuses it in one line, naming
    the mode; tests pass data objects of their own)."""
    mode = data.get("mode")
    if mode == "pretok":
        for key in ("tokens", "seed", "epoch", "position"):
            _int(_entry(data, key, field), f"{field}.{key}")
        _int(_entry(data, "block_size", field), f"{field}.block_size", 1)
        return
    if mode != "stream":
        return
    for key in ("epoch", "batches", "seed", "buffer_size"):
        _int(_entry(data, key, field), f"{field}.{key}")
    for key in ("num_streams", "batch_size", "block_size"):
        _int(_entry(data, key, field), f"{field}.{key}", 1)
    holdout = data.get("holdout")
    if holdout is not None and not isinstance(holdout, list):
        raise _Bad(f"{field}.holdout", f"is {holdout!r:.40}, not a list or null")
    streams = _entry(data, "streams", field)
    if not isinstance(streams, list) or len(streams) * world_size != data["num_streams"]:
        raise _Bad(f"{field}.streams", f"is not a list of num_streams / world_size positions "
                                       f"({data['num_streams']} / {world_size})")  # fmt: skip
    for i, s in enumerate(streams):
        if _obj(s, f"{field}.streams[{i}]") is not None:
            for key in _STREAM_POSITION:
                _int(_entry(s, key, f"{field}.streams[{i}]"), f"{field}.streams[{i}].{key}")
            if not isinstance(_entry(s, "done", f"{field}.streams[{i}]"), bool):
                raise _Bad(f"{field}.streams[{i}].done", "is not true or false")
    if not 0 <= _int(_entry(data, "next", field), f"{field}.next") < len(streams):
        raise _Bad(f"{field}.next", f"is {data['next']}, not a stream (0 to {len(streams) - 1})")


def _check_fields(state: Any, step: int | None) -> None:
    if not isinstance(state, dict):
        raise _Bad("", f"holds a {type(state).__name__}, not an object")
    got = _int(_entry(state, "step", "state"), "step")
    if step is not None and got != step:
        raise _Bad("step", f"is {got} but the checkpoint is of step {step} (its folder name and "
                           "completion marker)")  # fmt: skip
    for key in ("epoch", "tokens_seen", "nonfinite_skips"):
        if key in state:
            _int(state[key], key)
    if "batch_size" in state:
        _int(state["batch_size"], "batch_size", 1)
    if "learning_rate" in state:
        _number(state["learning_rate"], "learning_rate")
    world = _int(state.get("world_size", 1), "world_size", 1)
    _obj(state.get("scheduler"), "scheduler")
    if _obj(state.get("scaler"), "scaler"):
        _check_scaler(state["scaler"], "scaler")
    ranks = state.get("ranks")
    if ranks is not None and (not isinstance(ranks, list) or len(ranks) != world):
        raise _Bad("ranks", f"is not a list of world_size ({world}) per-rank states")
    per_rank = [("", state)] + [(f"ranks[{i}].", _obj(r, f"ranks[{i}]", False))
                                for i, r in enumerate(ranks or [])]  # fmt: skip
    for prefix, d in per_rank:
        if prefix:  # rank_state reads both of a rank's entries
            _entry(d, "data", prefix[:-1]), _entry(d, "rng", prefix[:-1])
        if _obj(d.get("data"), f"{prefix}data") is not None:
            # a streamed position holds this rank's streams only (rank 0's, at the top level)
            _check_data(d["data"], f"{prefix}data", world)
        if _obj(d.get("rng"), f"{prefix}rng") is not None:
            _parse_rng(d["rng"], f"{prefix}rng")


def check_trainer_state(path: Path, state: Any, step: int | None = None) -> None:
    """CheckpointError (one line naming the file and the field) unless `state`, read from `path`,
    holds every field the trainer reads in a form it can use (the module docstring), and its
    step is `step` (the checkpoint's own, when known)."""
    try:
        _check_fields(state, step)
    except _Bad as e:
        if not e.field:
            problem = f"{path} {e.problem}"
        elif e.field == "state.step":
            problem = f"{path} has no 'step' field"
        else:
            problem = f"{path}: field {e.field!r} {e.problem}"
        raise CheckpointError(f"{problem} (corrupt checkpoint)") from None


def check_optimizer_meta(path: Path, meta: Any) -> None:
    """optimizer.json (train/checkpoint/optimizer.py save_optimizer) has the form load_optimizer
    reads: CheckpointError naming the file and the field. What it holds is checked against the
    model and optimizer when loaded (parameter groups and names, each state tensor's shape)."""

    def bad(field: str, what: str) -> CheckpointError:
        return CheckpointError(f"{path}: field {field!r} is not {what} (corrupt checkpoint)")

    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} holds a {type(meta).__name__}, not an object (corrupt)")
    groups, state, weight_map = meta.get("param_groups"), meta.get("state"), meta.get("weight_map")
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise bad("param_groups", "a list of objects")
    for i, g in enumerate(groups):
        params = g.get("params")
        if not isinstance(params, list) or not all(isinstance(n, str) for n in params):
            raise bad(f"param_groups[{i}].params", "a list of parameter names")
        if not isinstance(g.get("tuple_keys", []), list):
            raise bad(f"param_groups[{i}].tuple_keys", "a list")
    if not isinstance(weight_map, dict) or not all(
        isinstance(f, str) and "/" not in f and (path.parent / f).is_file()
        for f in weight_map.values()
    ):
        raise bad("weight_map", "a map of tensor keys to optimizer shards in its folder")
    if not isinstance(state, dict):
        raise bad("state", "an object")
    for name, entries in state.items():
        if not isinstance(entries, dict) or not all(
            isinstance(e, dict) and (set(e) == {"value"} or set(e) == {"tensor"})
            for e in entries.values()
        ):
            raise bad(f"state.{name}", 'an object of {"tensor": key} or {"value": v} entries')
