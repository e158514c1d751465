"""What a Llama checkpoint folder holds, read without loading a tensor: the weight map (from the
index, or the single model.safetensors), each shard's tensor names, and whether the shard
headers' names and shapes are exactly those config.json implies (octo/hf_io.py loads only then).

safetensors keeps every tensor's name, dtype and shape in a JSON header at the start of the file,
so these checks read a few kilobytes per shard, however large the model a config.json declares.

    read_weight_map(DIR) -> {tensor name: shard file name}
    shard_keys(shard) -> [tensor name, ...]
    check_weights(DIR, cfg, weight_map)   WeightsMismatch (a ValueError) saying what differs
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open

from octo.config import OctoConfig
from octo.integrity import inside_folder

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")

MISSING = "missing"  # the model has tensors the folder lacks
UNEXPECTED = "unexpected"  # the folder has tensors the model does not
NOT_IN_SHARD = "not_in_shard"  # the index names a shard that lacks the tensor
SHAPE = "shape"  # a tensor's shape differs from the model's


class WeightsMismatch(ValueError):
    """A folder's tensors are not those the model expects. kind: MISSING, UNEXPECTED,
    NOT_IN_SHARD or SHAPE; names: the first few tensors concerned, in the order checked; count:
    how many there are; file: the shard (NOT_IN_SHARD, SHAPE); got, want: the file's and the
    model's shapes (SHAPE). str(e) is a one-line message for a model loaded from its own
    config.json; a caller with another point of view (a resumed run) words its own from the
    fields."""

    def __init__(
        self,
        message: str,
        kind: str,
        names: list[str],
        count: int,
        file: Path | None = None,
        got: tuple[int, ...] | None = None,
        want: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__(message)
        self.kind, self.names, self.count = kind, names, count
        self.file, self.got, self.want = file, got, want


def read_weight_map(directory: Path) -> dict[str, str]:
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
        return {name: SINGLE_NAME for name in shard_keys(single)}
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


def shard_keys(path: Path) -> list[str]:
    """The tensor names in a safetensors file (from its header); ValueError naming it when it is
    missing or does not parse."""
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
    """WeightsMismatch (one line) unless the folder's tensors are exactly those config.json
    implies, with its shapes: names from the index, shapes from the shard headers (safetensors
    reads only the header), nothing allocated. So a config.json that declares a larger model
    than its weights (a hand edit, another tool's bug) is refused before that model is built.
    weight_map is that of a model to load: no tied lm_head, no ignored tensors."""
    unexpected = sorted(n for n in weight_map if cfg.weight_shape(n) is None)
    missing = cfg.num_weights() - (len(weight_map) - len(unexpected))
    if missing:  # the first few by name; the count by arithmetic (config.json may say 10**6 layers)
        examples = []
        for name, _ in cfg.weight_shapes():
            if name not in weight_map:
                examples.append(name)
                if len(examples) == 3:
                    break
        raise WeightsMismatch(
            f"{directory}: {missing} tensor(s) missing, e.g. {examples}; the checkpoint does not "
            "match config.json",
            MISSING,
            examples,
            missing,
        )
    if unexpected:
        raise WeightsMismatch(
            f"{directory}: {len(unexpected)} unexpected tensor(s), e.g. {unexpected[:3]}; the "
            "checkpoint does not match config.json or is not a Llama model",
            UNEXPECTED,
            unexpected[:3],
            len(unexpected),
        )
    by_file: dict[str, list[str]] = {}
    for name, file_name in weight_map.items():
        by_file.setdefault(file_name, []).append(name)
    for file_name, names in sorted(by_file.items()):
        path = directory / file_name
        keys = set(shard_keys(path))
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in names:
                    if name not in keys:
                        raise WeightsMismatch(
                            f"tensor {name} is not in {path} as the index says; re-save",
                            NOT_IN_SHARD,
                            [name],
                            1,
                            file=path,
                        )
                    shape, want = tuple(f.get_slice(name).get_shape()), cfg.weight_shape(name)
                    if shape != want:
                        raise WeightsMismatch(
                            f"tensor {name} in {path} has shape {shape}, the model from "
                            f"config.json expects {want}",
                            SHAPE,
                            [name],
                            1,
                            file=path,
                            got=shape,
                            want=want,
                        )
        except SafetensorError as e:
            raise ValueError(f"shard {path} is truncated or corrupt ({e}); re-save it") from None
