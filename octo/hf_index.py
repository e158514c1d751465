"""What a Llama checkpoint folder holds, read without loading a tensor: the weight map (from the
index, or the single model.safetensors), each shard's tensor names, and whether the shard
headers' names and shapes are exactly those config.json implies (octo/hf_io.py loads only then).

safetensors keeps every tensor's name, dtype and shape in a JSON header at the start of the file,
so these checks read a few kilobytes per shard, however large the model a config.json declares.
"""

from __future__ import annotations

import json
from pathlib import Path

from octo.config import OctoConfig
from octo.integrity import inside_folder

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def _read_weight_map(directory: Path) -> dict[str, str]:
    """name -> shard file name, from the index or the single model.safetensors."""
    index_path = directory / INDEX_NAME
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            weight_map = index["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(
                f"{index_path} is not a safetensors index ({e!r}); re-save the model"
            ) from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path} has an empty or invalid weight_map; re-save the model")
        outside = [f for f in weight_map.values() if not inside_folder(f)]
        if outside:
            raise ValueError(f"{index_path} names {outside[0]!r}, not a file in its folder")
        return weight_map
    single = directory / SINGLE_NAME
    if single.is_file():
        return {name: SINGLE_NAME for name in _shard_keys(single)}
    for name in PICKLE_NAMES:
        if (directory / name).is_file():
            raise ValueError(
                f"{directory / name} is a pickle checkpoint and Octo never unpickles; convert it "
                "with transformers: LlamaForCausalLM.from_pretrained(d).save_pretrained(d2) "
                "(writes safetensors)"
            )
    raise ValueError(
        f"{directory} has no {INDEX_NAME} or {SINGLE_NAME}; is it a model checkpoint folder?"
    )


def _shard_keys(path: Path) -> list[str]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise ValueError(f"missing shard {path}; the checkpoint is incomplete, re-save it")
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except SafetensorError as e:
        raise ValueError(
            f"shard {path} is truncated or corrupt ({e}); re-save the checkpoint"
        ) from None


def check_weights(directory: Path, cfg: OctoConfig, weight_map: dict[str, str]) -> None:
    """ValueError (one line) unless the folder's tensors are exactly those config.json implies,
    with its shapes: names from the index, shapes from the shard headers (safetensors reads
    only the header), nothing allocated. So a config.json that declares a larger model than its
    weights (a hand edit, another tool's bug) is refused before that model is built. weight_map
    is that of a model to load: no tied lm_head, no ignored tensors."""
    from safetensors import SafetensorError, safe_open

    unexpected = sorted(n for n in weight_map if cfg.weight_shape(n) is None)
    missing = cfg.num_weights() - (len(weight_map) - len(unexpected))
    if missing:  # the first few by name; the count by arithmetic (config.json may say 10**6 layers)
        examples = []
        for name, _ in cfg.weight_shapes():
            if name not in weight_map:
                examples.append(name)
                if len(examples) == 3:
                    break
        raise ValueError(
            f"{directory}: {missing} tensor(s) missing, e.g. {examples}; the checkpoint does not "
            "match config.json"
        )
    if unexpected:
        raise ValueError(
            f"{directory}: {len(unexpected)} unexpected tensor(s), e.g. {unexpected[:3]}; the "
            "checkpoint does not match config.json or is not a Llama model"
        )
    by_file: dict[str, list[str]] = {}
    for name, file_name in weight_map.items():
        by_file.setdefault(file_name, []).append(name)
    for file_name, names in sorted(by_file.items()):
        path = directory / file_name
        keys = set(_shard_keys(path))
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in names:
                    if name not in keys:
                        raise ValueError(
                            f"tensor {name} is not in {path} as the index says; re-save"
                        )
                    shape, want = tuple(f.get_slice(name).get_shape()), cfg.weight_shape(name)
                    if shape != want:
                        raise ValueError(
                            f"tensor {name} in {path} has shape {shape}, the model from "
                            f"config.json expects {want}"
                        )
        except SafetensorError as e:
            raise ValueError(f"shard {path} is truncated or corrupt ({e}); re-save it") from None
