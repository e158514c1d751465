"""The model a run trains, resolved once: from the config's model_config (a preset, a JSON file,
the fields themselves) or init_from's config.json, to the OctoConfig the Trainer builds.

    fields = load_model_config(cfg)          # at start: OctoConfig fields, vocab_size None when
                                             # the tokenizer sizes it (ConfigError, one line)
    cfg, spec = run_config(cfg, fields)      # first thing in run(): the config every saved copy
                                             # records, and the ModelSpec; both frozen
    model_cfg = spec.resolve(tokenizer)      # vocab_size from the tokenizer: THE OctoConfig

Imports octo (torch) at the top: python -m train imports this module only once the training
config is valid, so a bad key is reported without waiting for torch.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from octo.config import PRESETS, OctoConfig
from train.config import TrainConfig, empty_model_config_error
from train.errors import ConfigError, DataError


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The model as the config decides it, validated at start: OctoConfig fields (read-only;
    vocab_size None when the tokenizer sizes it), and init_from, the model folder whose weights
    start the run (None: fresh weights)."""

    fields: Mapping[str, Any]
    init_from: str | None = None

    def resolve(self, tokenizer: Any) -> OctoConfig:
        """The run's OctoConfig: the fields with vocab_size sized to `tokenizer`."""
        vocab = resolve_vocab_size(self.fields["vocab_size"], tokenizer)
        return OctoConfig.from_dict({**self.fields, "vocab_size": vocab})


def run_config(cfg: TrainConfig, fields: Mapping[str, Any]) -> tuple[TrainConfig, ModelSpec]:
    """Once, first thing in a run: the run's config as every saved copy records it, and its
    ModelSpec. The saved configs say what the run did: the model by its fields (or preset name,
    resolved_model_config) and the data mode it used (pretokenize); init_from is done once it is
    loaded, so a resume of this run (resume_from) takes the weights as they are (init_from None).
    `fields`: load_model_config's result."""
    spec = ModelSpec(MappingProxyType(dict(fields)), cfg.init_from)
    cfg = dataclasses.replace(
        cfg,
        model_config=resolved_model_config(cfg, fields),
        pretokenize=cfg.pretokenized,
        init_from=None,
    )
    return cfg, spec


def load_model_config(cfg: TrainConfig, override: str | None = None) -> dict[str, Any]:
    """The model's shape as OctoConfig fields, validated, before any data or model is loaded.

    Source: `override` (a file or preset in place of cfg.model_config), else cfg.model_config
    (python -m train's --model-config is there: TrainConfig.load), else the "seed" preset. A JSON
    file (ours or a transformers Llama config.json) keeps its vocab_size when it names one; a
    preset name gives the architecture only; a dict is the fields themselves. vocab_size is None
    when the tokenizer should size it (resolve_vocab_size). Raises ConfigError (one
    line) for a missing file, an unknown key (nearest valid key named), an impossible shape, or
    block_size > max_position_embeddings.
    """
    if cfg.init_from is not None:
        return _init_from_fields(cfg, override)
    source = override if override is not None else cfg.model_config
    if source == "":  # would otherwise mean the seed preset
        raise empty_model_config_error()
    source = source or "seed"
    try:
        if isinstance(source, dict):  # the fields themselves (a saved train_config.json)
            fields = {"vocab_size": None, **source}
            source = "fields in model_config"
        elif source in PRESETS:
            fields = {**PRESETS[source], "vocab_size": None}
        else:
            p = Path(source)
            if p.is_dir():
                raise ConfigError(
                    f"model config {source!r} is a folder; pass a JSON file or one of "
                    f"{', '.join(sorted(PRESETS))}"
                )
            if not p.is_file():
                raise ConfigError(
                    f"model config {source!r} is neither a JSON file nor a preset; "
                    f"pass a file path or one of {', '.join(sorted(PRESETS))}"
                )
            fields = OctoConfig.from_json_file(p).to_dict()  # ValueError on bad JSON or keys
            if "vocab_size" not in json.loads(p.read_text(encoding="utf-8")):
                fields["vocab_size"] = None
        # vocab_size is checked again once the tokenizer sized it; 64 stands in until then.
        vocab = fields["vocab_size"]
        fields = OctoConfig.from_dict({**fields, "vocab_size": vocab or 64}).to_dict()
        fields["vocab_size"] = vocab
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        msg = str(e)  # OctoConfig.from_json_file's messages name the file already
        raise ConfigError(
            msg if msg.startswith("model config ") else f"model config {source}: {msg}"
        ) from None
    if cfg.block_size > fields["max_position_embeddings"]:
        raise ConfigError(
            f"block_size {cfg.block_size} exceeds the model's max_position_embeddings "
            f"{fields['max_position_embeddings']}; lower block_size or raise "
            "max_position_embeddings in the model config"
        )
    return fields


def _init_from_fields(cfg: TrainConfig, override: str | None) -> dict[str, Any]:
    """The model shape of cfg.init_from: its config.json (Octo's or a transformers Llama one),
    vocab_size included, since the weights fix it. A model_config given as well must describe
    the same shape (a vocab_size it leaves to the tokenizer aside); otherwise ConfigError."""
    folder = Path(cfg.init_from)
    kinds = "a final model folder, a checkpoint_step_N folder or a transformers Llama folder"
    if not folder.is_dir():
        state = "is a file" if folder.exists() else "does not exist"
        raise ConfigError(f"init_from {folder} {state}; name {kinds}")
    if not (folder / "config.json").is_file():
        held = (folder / "final").is_dir() or any(folder.glob("checkpoint_step_*"))
        hint = f" (it holds a run's checkpoints: name {folder / 'final'} or one of them)"
        raise ConfigError(
            f"init_from {folder} has no config.json{hint if held else ''}; name {kinds}"
        )
    plain = dataclasses.replace(cfg, init_from=None)
    fields = load_model_config(plain, str(folder / "config.json"))
    if (override if override is not None else cfg.model_config) is not None:
        other = load_model_config(plain, override)
        for name, value in other.items():
            if value is not None and value != fields[name]:
                raise ConfigError(
                    f"model_config gives {name}={value}, but init_from {folder}'s config.json has "
                    f"{fields[name]}; set model_config to null (init_from gives the model's shape)"
                )
    return fields


def resolved_model_config(cfg: TrainConfig, fields: Mapping[str, Any]) -> str | dict[str, Any]:
    """What cfg.model_config should read in the configs a run saves (log folder, checkpoints), so
    that `--config <checkpoint>/train_config.json` rebuilds the same model from any working
    directory, even after the model file was edited or moved: a preset name as it is (its fields
    live in the code), otherwise `fields` (load_model_config's result; vocab_size None when the
    tokenizer sizes it; with init_from, its config.json's fields)."""
    source = cfg.model_config or "seed"
    preset = isinstance(source, str) and source in PRESETS and cfg.init_from is None
    return source if preset else dict(fields)


def resolve_vocab_size(model_vocab_size: int | None, tokenizer) -> int:
    """The model's vocab_size: None -> len(tokenizer) rounded up to a multiple of 64 (tensor-core
    friendly); smaller than the tokenizer -> DataError naming both numbers and both fixes."""
    n = len(tokenizer)
    rounded = -(-n // 64) * 64
    if model_vocab_size is None:
        return rounded
    if model_vocab_size < n:
        name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        raise DataError(
            f"model vocab_size {model_vocab_size} is smaller than tokenizer {name!r}'s {n} tokens; "
            f"drop vocab_size from the model config (it then becomes {rounded}), or train a "
            f"tokenizer of that size (python -m train.tokenizer --config CONFIG --vocab-size "
            f"{model_vocab_size} --out DIR) and set tokenizer_name to DIR"
        )
    return model_vocab_size
