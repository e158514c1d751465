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

Here: the folder as a whole (save_pretrained, from_pretrained = checks + empty_model +
load_weights). Shards and durable writes are octo/files.py's, the index and shard headers
octo/hf_index.py's, the marker octo/integrity.py's.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from octo.config import OctoConfig
from octo.files import (
    fsync,
    parse_size,
    plan_shards,
    read_header,
    read_tensors,
    save_safetensors,
    write_json,
)
from octo.hf_index import (
    INDEX_NAME,
    MISSING,
    NOT_IN_SHARD,
    SHAPE,
    SINGLE_NAME,
    UNEXPECTED,
    WeightsMismatch,
    check_weights,
    read_weight_map,
)
from octo.integrity import verify_marked
from octo.memory import check_fits, weights_bytes

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# Tensors some Llama checkpoints carry that are not weights (old transformers saved the rotary
# inverse frequencies); transformers skips them on load, and so do we.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


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
        fsync(out / file_name)
        weight_map.update(dict.fromkeys(keys, file_name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {
        "metadata": {
            "total_size": total,
            "total_parameters": sum(t.numel() for t in tensors.values()),
        },
        "weight_map": dict(sorted(weight_map.items())),
    }
    write_json(out / INDEX_NAME, index, indent=2, sort_keys=True)
    float_dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    dtype = str(next(iter(float_dtypes))).removeprefix("torch.") if len(float_dtypes) == 1 else None
    token_ids = dict(token_ids or {})
    hf = cfg.to_hf_dict(dtype=dtype or "float32", bos_token_id=token_ids.get("bos_token_id"),
                        eos_token_id=token_ids.get("eos_token_id"))  # fmt: skip
    write_json(out / CONFIG_NAME, hf, indent=2, sort_keys=True)
    if token_ids:
        write_json(out / GENERATION_CONFIG_NAME, token_ids, indent=2, sort_keys=True)
    elif (out / GENERATION_CONFIG_NAME).is_file():  # an earlier save's, naming other tokens
        (out / GENERATION_CONFIG_NAME).unlink()
    fsync(out)


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
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"checkpoint folder {directory} does not exist")
    if not (directory / CONFIG_NAME).is_file():
        raise ValueError(f"{directory} has no {CONFIG_NAME}; is it a model checkpoint folder?")
    # A marked folder (a checkpoint, a final model: octo/integrity.py) is checked before its
    # files are parsed, so an edited config.json is named as changed, not as a bad config.
    _verify(directory, [n for n in (CONFIG_NAME, INDEX_NAME) if (directory / n).is_file()])
    cfg = OctoConfig.from_json_file(directory / CONFIG_NAME)
    weight_map = read_weight_map(directory)
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
    model = empty_model(cls, cfg, device=device, dtype=dtype)
    load_weights(model, directory, weight_map)
    return model.eval()


def empty_model(
    cls: type[nn.Module],
    cfg: OctoConfig,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """cls(cfg) built on the meta device, so there is no init cost and the global RNG is
    untouched; then uninitialised storage on `device` in `dtype` (default: as built, float32),
    for weights that are loaded next, or, given `state` (a full state dict), its own tensors
    (load_state_dict(assign=True): no copy, no second allocation). A tied lm_head is tied again
    (to_empty and assign give each module a tensor of its own)."""
    with torch.device("meta"):
        model = cls(cfg)
    if state is not None:
        model.load_state_dict(state, assign=True)
    else:
        model.to_empty(device=device)
    if dtype is not None:
        model.to(dtype)
    model.tie_weights()
    return model


def load_weights(
    model: nn.Module, directory: Path, weight_map: dict[str, str] | None = None
) -> None:
    """Fill `model` (an unwrapped OctoForCausalLM, any device or dtype) in place from directory's
    safetensors: the tensors of weight_map ({name: shard file}; default: the folder's own,
    read_weight_map). Names and shapes are checked against the shard headers first, in the
    model's state_dict order, so the first mismatch named is the model's first: WeightsMismatch
    (a tensor the model lacks, a model tensor the map lacks unless it is tied to one it has, a
    shard without a tensor its index lists, a shape). Then each shard is read once with
    octo.files.read_tensors: plain reads straight into the parameters' storage when they are
    contiguous CPU tensors of the file's dtype, a copy otherwise. A damaged shard is a ValueError
    naming it."""
    directory = Path(directory)
    weight_map = read_weight_map(directory) if weight_map is None else weight_map
    params = model.state_dict()
    unknown = sorted(set(weight_map) - set(params))
    if unknown:
        raise WeightsMismatch(f"{directory}: tensor {unknown[0]!r} is not in the model",
                              UNEXPECTED, unknown[:3], len(unknown))  # fmt: skip
    loaded = {params[k].data_ptr() for k in weight_map}
    missing = [k for k, t in params.items() if k not in weight_map and t.data_ptr() not in loaded]
    if missing:  # a tied weight may be stored once, under its other name
        raise WeightsMismatch(f"{directory}: the model's tensor {missing[0]!r} is missing",
                              MISSING, missing[:3], len(missing))  # fmt: skip
    by_file: dict[str, list[str]] = {}
    for name, file_name in weight_map.items():
        by_file.setdefault(file_name, []).append(name)
    headers = {file_name: read_header(directory / file_name)[1] for file_name in by_file}
    for name in (k for k in params if k in weight_map):  # the model's order
        path = directory / weight_map[name]
        header = headers[weight_map[name]]
        if name not in header:
            raise WeightsMismatch(f"tensor {name} is not in {path} as the index says; re-save",
                                  NOT_IN_SHARD, [name], 1, file=path)  # fmt: skip
        got, want = tuple(header[name]["shape"]), tuple(params[name].shape)
        if got != want:
            raise WeightsMismatch(f"tensor {name} in {path} has shape {got}, the model's is {want}",
                                  SHAPE, [name], 1, file=path, got=got, want=want)  # fmt: skip
    for file_name, names in sorted(by_file.items()):
        read_tensors(directory / file_name, into={k: params[k] for k in names})
