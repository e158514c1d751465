"""Checkpoint folders in transformers' Llama format: config.json + sharded safetensors.

    DIR/config.json                            a LlamaConfig (OctoConfig.to_hf_dict)
    DIR/model-0000K-of-0000N.safetensors        tensors, each shard at most max_shard_size bytes
    DIR/model.safetensors.index.json            {"metadata": {...}, "weight_map": {name: shard}}

The index is written even for one shard, so a folder always has the same shape. A folder written
here loads in `transformers.LlamaForCausalLM.from_pretrained`, and `from_pretrained` below reads
folders written by transformers (sharded, or one `model.safetensors`; tied or untied).

Loading never unpickles: only safetensors are read; a folder holding only `pytorch_model.bin` is
refused with the file named. Every problem (missing config or shard, truncated shard, missing or
unexpected tensor, shape mismatch, a model too large for the device) is one ValueError line
naming the file or tensor, found before anything is allocated (octo/hf_index.py reads the shard
headers; octo/memory.py estimates the bytes). A folder with a completion marker (a training
checkpoint, a final model: octo/integrity.py) is checked against it first, so a changed byte is
named as such.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from octo.config import OctoConfig
from octo.hf_index import INDEX_NAME, SINGLE_NAME, _read_weight_map, check_weights
from octo.integrity import verify_marked

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# Tensors some Llama checkpoints carry that are not weights (old transformers saved the rotary
# inverse frequencies); transformers skips them on load, and so do we.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like transformers': "2GB" (10^9), "500MB", "1GiB" (2^30),
    "50KB"; a lowercase trailing "b" as in "5Gb" means bits, as in transformers."""
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise ValueError(f"max_shard_size must be an int or a string like '2GB', got {size!r}")
    if isinstance(size, int):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?I?B?)\s*", size, flags=re.IGNORECASE)
        if m is None or m.group(2).upper() not in _UNITS:
            raise ValueError(
                f"max_shard_size {size!r} is not a size; use an int (bytes) or a string like "
                "'2GB', '500MB', '1GiB'"
            )
        n = int(m.group(1)) * _UNITS[m.group(2).upper()]
        if size.strip().endswith("b") and m.group(2).upper() in ("KB", "MB", "GB", "TB"):
            n //= 8  # bits, transformers' convention
    if n <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return n


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model inside torch.compile's OptimizedModule (`_orig_mod`) and DDP (`module`)."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def clean_key(name: str) -> str:
    """A state-dict key without wrapper prefixes: every `_orig_mod.` (torch.compile of the model
    or of single layers) and a leading `module.` (DDP)."""
    name = name.replace("_orig_mod.", "")
    return name[len("module.") :] if name.startswith("module.") else name


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors.torch.save_file (metadata format "pt"), with a failed write raised as the
    OSError it is. The library reports a full disk as SafetensorError("... No space left on
    device (os error 28)"), which is no OSError and carries no errno, so a caller could neither
    tell it from a bug nor say what to do."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except SafetensorError as e:
        found = re.search(r"\(os error (\d+)\)", str(e))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from e


def _fsync_path(path: Path) -> None:
    """Flush a written file (or a directory entry list) to disk."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj: dict) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def plan_shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Names grouped into shards of at most max_bytes each (also used for optimizer state).
    Greedy, in state-dict order (transformers' rule): a new shard starts when the next tensor
    would overflow the current one; a tensor larger than max_bytes gets a shard of its own."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def save_pretrained(
    model: nn.Module,
    save_directory: str | Path,
    max_shard_size: int | str = "2GB",
    state_dict: dict[str, torch.Tensor] | None = None,
    token_ids: dict[str, int] | None = None,
) -> None:
    """Write `model` (an OctoForCausalLM, possibly compiled or DDP-wrapped) as a Llama folder.

    state_dict: the tensors to write instead of model.state_dict() (e.g. a full state dict that
    FSDP gathered onto rank 0); its keys are cleaned of wrapper prefixes like the model's.
    Tensors keep their dtype; config.json records it. A tied lm_head is not written (it is
    embed_tokens), exactly as transformers does, so safetensors never sees shared memory.
    token_ids: the tokenizer's {bos,eos,pad}_token_id (octo.tokenizer_files.special_token_ids),
    written into config.json and generation_config.json, so that transformers' generate() and
    pipeline() stop at end-of-text as Octo does; without them neither file names a token.
    """
    inner = unwrap_model(model)
    cfg: OctoConfig = inner.config
    max_bytes = parse_size(max_shard_size)
    source = inner.state_dict() if state_dict is None else state_dict
    tensors = {clean_key(k): v for k, v in source.items()}
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    elif (
        "lm_head.weight" in tensors
        and tensors["lm_head.weight"].data_ptr() == tensors["model.embed_tokens.weight"].data_ptr()
    ):
        raise ValueError(
            "lm_head.weight is embed_tokens.weight but config.tie_word_embeddings is false; set "
            "tie_word_embeddings=true or untie the weights before saving"
        )
    for name, t in tensors.items():
        if type(t) is not torch.Tensor and not isinstance(t, nn.Parameter):
            raise ValueError(
                f"tensor {name} is a {type(t).__name__}, not a plain tensor; gather a full state "
                "dict first (e.g. FSDP's get_model_state_dict(full_state_dict=True)) and pass it "
                "as state_dict="
            )
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}

    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    plan = plan_shards(tensors, max_bytes)
    names = [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    # Shards of an earlier save into this folder would be read as part of this one.
    for old in out.iterdir():
        if old.name == SINGLE_NAME or (SHARD_RE.fullmatch(old.name) and old.name not in names):
            old.unlink()
    weight_map = {}
    for file_name, keys in zip(names, plan):
        save_safetensors({k: tensors[k] for k in keys}, out / file_name)
        _fsync_path(out / file_name)
        weight_map.update(dict.fromkeys(keys, file_name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {
        "metadata": {
            "total_size": total,
            "total_parameters": sum(t.numel() for t in tensors.values()),
        },
        "weight_map": dict(sorted(weight_map.items())),
    }
    _write_json(out / INDEX_NAME, index)
    float_dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    dtype = str(next(iter(float_dtypes))).removeprefix("torch.") if len(float_dtypes) == 1 else None
    token_ids = dict(token_ids or {})
    hf = cfg.to_hf_dict(dtype=dtype or "float32", bos_token_id=token_ids.get("bos_token_id"),
                        eos_token_id=token_ids.get("eos_token_id"))  # fmt: skip
    _write_json(out / CONFIG_NAME, hf)
    if token_ids:
        _write_json(out / GENERATION_CONFIG_NAME, token_ids)
    elif (out / GENERATION_CONFIG_NAME).is_file():  # an earlier save's, naming other tokens
        (out / GENERATION_CONFIG_NAME).unlink()
    _fsync_path(out)


def _verify(directory: Path, names: list[str]) -> None:
    """octo.integrity.verify_marked, with what to do about a damaged folder."""
    try:
        verify_marked(directory, names)
    except ValueError as e:
        raise ValueError(f"{e}; use an intact copy (of a checkpoint: an earlier one)") from None


def from_pretrained(
    cls: type[nn.Module],
    directory: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Build `cls(config)` from DIR/config.json and fill it from DIR's safetensors.

    device: where the parameters live (default CPU); dtype: their dtype (default float32, the
    training master dtype, whatever the file holds). Before anything is allocated, the shard
    headers are checked against config.json and the model's bytes against the device's free
    memory (octo.memory; TooLargeError, a ValueError). The model is built on the meta device, so
    loading costs no random init and leaves the global RNG untouched. Returned in eval mode,
    as transformers does.
    """
    from safetensors import SafetensorError, safe_open

    from octo.memory import check_fits, weights_bytes

    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"checkpoint folder {directory} does not exist")
    if not (directory / CONFIG_NAME).is_file():
        raise ValueError(f"{directory} has no {CONFIG_NAME}; is it a model checkpoint folder?")
    # A marked folder (a checkpoint, a final model: octo/integrity.py) is checked before its
    # files are parsed, so an edited config.json is named as changed, not as a bad config.
    _verify(directory, [n for n in (CONFIG_NAME, INDEX_NAME) if (directory / n).is_file()])
    cfg = OctoConfig.from_json_file(directory / CONFIG_NAME)
    weight_map = _read_weight_map(directory)
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if not (directory / shard).is_file():
            n = sum(1 for f in weight_map.values() if f == shard)
            raise ValueError(
                f"shard {directory / shard} is missing, but {directory / INDEX_NAME} lists it (for "
                f"{n} tensor(s)); the folder is incomplete: copy it again or re-save the model"
            )
    _verify(directory, shards)
    if cfg.tie_word_embeddings:
        weight_map.pop("lm_head.weight", None)  # some checkpoints also store the tied copy
    for name in [n for n in weight_map if n.endswith(IGNORED_SUFFIXES)]:
        del weight_map[name]
    check_weights(directory, cfg, weight_map)

    device = torch.device("cpu" if device is None else device)
    dtype = torch.float32 if dtype is None else dtype
    check_fits(weights_bytes(cfg, dtype), device, f"the model in {directory} ({dtype})",
               "load it on another device or in a smaller dtype")  # fmt: skip
    with torch.device("meta"):
        model = cls(cfg)
    model.to_empty(device=device)
    model.to(dtype)
    if cfg.tie_word_embeddings:  # to_empty gives each module its own tensor: tie again
        model.lm_head.weight = model.model.embed_tokens.weight
    params = model.state_dict()
    by_file: dict[str, list[str]] = {}
    for name, file_name in weight_map.items():
        by_file.setdefault(file_name, []).append(name)
    with torch.no_grad():
        for file_name, names in sorted(by_file.items()):
            path = directory / file_name
            try:
                with safe_open(str(path), framework="pt") as f:
                    for name in names:
                        params[name].copy_(f.get_tensor(name))
            except SafetensorError as e:
                raise ValueError(
                    f"shard {path} is truncated or corrupt ({e}); re-save it"
                ) from None
    return model.eval()
