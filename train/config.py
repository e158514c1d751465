"""TrainConfig: every key of train/config.json, typed, with defaults, validated before any run.

The seed's keys come first and mean what the seed's guide says; the keys after them have defaults
and are documented in the README. A bad key or value raises ConfigError, one line naming the key,
the value and the fix; `python -m train` turns it into exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import typing
from pathlib import Path
from typing import Any

from train.errors import ConfigError
from train.trackers import report_to_names

# Keys that name files or folders; an empty string is refused rather than read as "here".
PATH_KEYS = ("dataset_name", "tokenizer_name", "checkpoint_dir", "resume_from", "model_config",
             "init_from", "data_cache_dir", "log_dir")  # fmt: skip
NULLABLE_PATH_KEYS = ("resume_from", "model_config", "init_from")
# tokenizer_name in the train_config.json of a folder holding its own copy of the tokenizer (a
# checkpoint, final): `load` reads it as that config file's folder, wherever it was copied to
OWN_TOKENIZER = "."
# dataset_name / tokenizer_name: the generated demo corpus / its BPE (train/data/demo.py), built
# under data_cache_dir on first use
DEMO_NAME = "octo-demo"


def key(default: Any, help: str) -> Any:
    """A TrainConfig field with its meaning: the one place a key is documented. `python -m train
    --help` lists it, and the README's key tables are train.config_docs.key_table's output."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class TrainConfig:
    # ----- the seed's keys (train/config.json: the seed guide's file, value for value) ---------
    dataset_name: str = key(
        "roneneldan/TinyStories",
        "Hub dataset (streamed), or a local `.txt`/`.jsonl`/`.json`/`.parquet` file, glob or "
        "folder; `octo-demo` = the generated demo corpus",
    )
    train_split: str = key("train", "the training split")
    eval_split: str | None = key(
        "validation",
        "the evaluation split; null holds out `eval_holdout_fraction` of train",
    )
    text_column: str = key("text", "the column holding the text")
    tokenizer_name: str = key(
        "gpt2",
        "Hub name or local folder (fast tokenizers); `octo-demo` = the demo's BPE; `.` in a "
        "config file = that file's folder (how a checkpoint's train_config.json names its own "
        "tokenizer copy)",
    )
    block_size: int = key(512, "tokens per sequence (documents are packed, EOS between them)")
    batch_size: int = key(16, "sequences per micro-batch, per process")
    gradient_accumulation_steps: int = key(
        4,
        "micro-batches per optimizer step; the loss is normalised by the target tokens of all "
        "of them",
    )
    num_epochs: int = key(1, "passes over the training data (reshuffled per epoch from the seed)")
    learning_rate: float = key(3e-4, "peak learning rate, after warmup")
    weight_decay: float = key(0.01, "AdamW decay, not applied to norms, biases and embeddings")
    warmup_steps: int = key(100, "linear warmup steps")
    max_grad_norm: float = key(1.0, "gradient clipping (0: off; the norm is logged either way)")
    seed: int = key(42, "seeds Python, NumPy, torch and the data order")
    log_interval_steps: int = key(50, "a log line every N steps")
    eval_interval_steps: int = key(500, "evaluation every N steps and at the end")
    save_interval_steps: int = key(
        5000, "a checkpoint every N steps, at the end, and on SIGINT/SIGTERM"
    )
    eval_max_batches: int = key(64, "evaluation batches at most")
    checkpoint_dir: str = key(
        "checkpoints",
        "where `checkpoint_step_N/` folders and `final/` go; one run at a time (a lock); a run "
        "that does not resume refuses a folder already holding a run's checkpoints",
    )
    resume_from: str | None = key(
        None,
        "a checkpoint folder, or a folder of them (its newest complete one), to continue its "
        "run exactly",
    )
    use_mixed_precision: bool = key(
        True, "bf16 autocast where supported, else fp16 + GradScaler (CUDA)"
    )
    use_gradient_checkpointing: bool = key(False, "recompute each layer's activations in backward")

    # ----- further keys -----------------------------------------------------------------------
    model_config: str | dict[str, Any] | None = key(
        None,
        "model JSON (ours or a transformers Llama `config.json`), a preset (`seed`, `tiny`), or "
        "the model's fields themselves (a checkpoint's `train_config.json` stores them so it "
        "rebuilds the same model anywhere); default: the seed architecture with vocab = "
        "tokenizer size rounded up to 64",
    )
    init_from: str | None = key(
        None,
        "a final model folder, a `checkpoint_step_N` folder or a transformers Llama folder "
        "(safetensors) whose weights start this run; its `config.json` gives the model's shape; "
        "optimizer, schedule and data order start fresh; not with resume_from or model_config",
    )
    max_steps: int | None = key(
        None,
        "optimizer steps; default: num_epochs worth of the pre-tokenized data (streamed data "
        "has no known size, so it needs max_steps)",
    )
    lr_schedule: str = key("cosine", "cosine, linear or constant after warmup")
    min_lr_ratio: float = key(0.1, "the decay's floor, as a fraction of learning_rate")
    adam_beta1: float = key(0.9, "AdamW beta1, in [0, 1)")
    adam_beta2: float = key(0.95, "AdamW beta2, in [0, 1)")
    adam_eps: float = key(1e-8, "AdamW epsilon, > 0 (torch's fused kernel on CUDA and CPU)")
    optimizer: str = key(
        "adamw",
        "adamw, or muon: `torch.optim.Muon` (torch >= 2.9) for the 2-D weights inside the decoder "
        "layers (q/k/v/o, gate/up/down), AdamW for embeddings, lm_head, norms and biases "
        "(train/muon.py); one schedule drives both; clipping covers all parameters; DDP yes, "
        "FSDP2 refused (Muon orthogonalises whole matrices, FSDP2 shards them)",
    )
    # the muon_* defaults: the sweep in bench/NOTES.md (demo and tiny-shakespeare)
    muon_learning_rate: float = key(
        0.01,
        "Muon's peak lr, on learning_rate's warmup and decay (Muon's lr = the scheduled lr x "
        "muon_learning_rate / learning_rate)",
    )
    muon_adamw_lr_scale: float = key(
        4.0,
        "with muon, AdamW's part steps at the scheduled lr x this (Muon's runs did best with it "
        "above the AdamW-only lr: bench/NOTES.md)",
    )
    muon_momentum: float = key(0.95, "Muon's Nesterov momentum, in [0, 1)")
    muon_weight_decay: float = key(
        0.0, "Muon's decoupled weight decay: W <- W (1 - lr x muon_weight_decay)"
    )
    precision: str = key("auto", "auto (from use_mixed_precision; fp32 on CPU), bf16, fp16, fp32")
    compile: str = key(
        "auto",
        "torch.compile of the step: auto (on for CUDA), on, off; cudagraphs = on + Inductor's "
        "CUDA graphs; graph = on + each micro-batch's forward, loss and backward captured as one "
        "CUDA graph and replayed (CUDA only; a failed capture is one line and the run goes on as "
        "on). Both graph modes: one process only, not yet measured on a GPU (bench/NOTES.md)",
    )
    device: str = key("auto", "auto, cpu, cuda, cuda:N")
    kernels: str = key(
        "auto",
        "auto (Triton on CUDA tensors, reference elsewhere), triton, torch; same as `OCTO_KERNELS`",
    )
    num_workers: int = key(
        2, "DataLoader worker processes that tokenize the stream (streamed data only)"
    )
    buffer_size: int = key(
        10000,
        "streamed data's shuffle window, in blocks; pre-tokenized data permutes all its blocks "
        "each epoch instead; 0: no shuffle in either mode",
    )
    pretokenize: bool | None = key(
        None,
        "true: tokenize once into memory-mapped shards under data_cache_dir/pretok (`python -m "
        "train.prepare --config ...` does it ahead); false: stream, tokenizing on the fly; "
        "null: true when max_steps is null, else false",
    )
    data_cache_dir: str = key("data_cache", "where pre-tokenized shards and the demo's files go")
    eval_holdout_fraction: float = key(
        0.0,
        "with `eval_split: null`, the fraction of train documents held out for evaluation",
    )
    keep_last_checkpoints: int = key(3, "complete checkpoints kept")
    max_shard_size: int | str = key(
        "2GB", "safetensors shard size: bytes (an int) or a string like `500MB`, `2GB`"
    )
    log_dir: str = key("logs", "`training_YYYYMMDD_HHMMSS.log` and `.jsonl` go here")
    report_to: str | list[str] = key(
        "none",
        "experiment trackers that get every log line and eval: `none`, `tensorboard`, `wandb`, "
        "`trackio`, or a list (see [Experiment trackers](#experiment-trackers))",
    )
    max_consecutive_nonfinite: int = key(
        5,
        "NaN/Inf steps skipped in a row before the run stops (with a checkpoint of the last "
        "good state)",
    )
    parallelism: str = key("ddp", "ddp or fsdp, under torchrun with several processes")
    sample_prompt: str = key(
        "Once upon a time", "the prompt of the three samples printed at the end"
    )
    sample_max_new_tokens: int = key(64, "tokens generated per sample at the end")

    def __post_init__(self) -> None:
        self.validate()

    @property
    def pretokenized(self) -> bool:
        """Read a pre-tokenized cache (True) or stream (False). pretokenize null picks: a cache
        when max_steps is null, because only counted tokens give num_epochs a number of steps (the
        seed's config), the stream otherwise (training starts at once)."""
        return self.max_steps is None if self.pretokenize is None else self.pretokenize

    # ----- validation -------------------------------------------------------------------------

    def validate(self) -> None:
        """Type, range and choice checks. Raises ConfigError with a one-line message."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), hints[f.name])
        # JSON and --set accept NaN and Infinity; no key means anything by them (an infinite
        # learning rate trains NaN weights, a NaN max_grad_norm silently turns clipping off).
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            is_int = isinstance(value, int) and not isinstance(value, bool)
            if is_int and _holds_float(hints[f.name]):
                # JSON's 0 is an int: torch's AdamW refuses betas (0, 0.95), an int beside a float
                value = float(value) if abs(value) < 2**1000 else math.inf
                setattr(self, f.name, value)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"config key {f.name!r} must be a finite number, got {value}")
        for name in PATH_KEYS:  # "" would silently mean the current folder
            if getattr(self, name) == "":
                none = " (or null for none)" if name in NULLABLE_PATH_KEYS else ""
                raise ConfigError(f"config key {name!r} is an empty string; give a path{none}")
        if self.init_from is not None and self.resume_from is not None:
            raise ConfigError(
                "config keys 'init_from' and 'resume_from' are both set: init_from starts a fresh "
                "run from trained weights, resume_from continues a run; set one of them to null"
            )
        if not -(2**63) <= self.seed < 2**64:  # what torch.manual_seed accepts
            raise ConfigError(f"config key 'seed' must be in [-2**63, 2**64), got {self.seed}")
        if self.block_size < 2:  # a block is inputs and their next tokens: one token predicts none
            raise ConfigError(
                f"config key 'block_size' must be at least 2 (tokens per sequence, each predicting "
                f"the next), got {self.block_size}"
            )
        positive = [
            "block_size", "batch_size", "gradient_accumulation_steps", "num_epochs",
            "log_interval_steps", "eval_interval_steps", "save_interval_steps", "eval_max_batches",
            "keep_last_checkpoints", "sample_max_new_tokens", "max_consecutive_nonfinite",
        ]  # fmt: skip
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(
                    f"config key {name!r} must be positive, got {getattr(self, name)}"
                )
        if self.max_steps is not None and self.max_steps <= 0:
            raise ConfigError(
                f"config key 'max_steps' must be positive or null, got {self.max_steps}"
            )
        for name in ("warmup_steps", "num_workers", "buffer_size"):
            if getattr(self, name) < 0:
                raise ConfigError(f"config key {name!r} must be >= 0, got {getattr(self, name)}")
        for name in ("learning_rate", "muon_learning_rate", "muon_adamw_lr_scale"):
            if not getattr(self, name) > 0:
                raise ConfigError(
                    f"config key {name!r} must be positive, got {getattr(self, name)}"
                )
        for name in ("weight_decay", "max_grad_norm", "muon_weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"config key {name!r} must be >= 0, got {getattr(self, name)}")
        unit = ("min_lr_ratio", "eval_holdout_fraction", "adam_beta1", "adam_beta2",
                "muon_momentum")  # fmt: skip
        for name in unit:
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(
                    f"config key {name!r} must be in [0, 1), got {getattr(self, name)}"
                )
        if not self.adam_eps > 0:
            raise ConfigError(f"config key 'adam_eps' must be positive, got {self.adam_eps}")
        choices = {
            "lr_schedule": ("cosine", "linear", "constant"),
            "precision": ("auto", "bf16", "fp16", "fp32"),
            "compile": ("auto", "on", "off", "cudagraphs", "graph"),
            "kernels": ("auto", "triton", "torch"),
            "parallelism": ("ddp", "fsdp"),
            "optimizer": ("adamw", "muon"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                value, options = getattr(self, name), ", ".join(allowed)
                raise ConfigError(f"config key {name!r} is {value!r}; choose one of {options}")
        try:
            report_to_names(self.report_to)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(
                f"config key 'device' is {self.device!r}; use auto, cpu, cuda or cuda:N"
            )
        # Parsed here, not at the first checkpoint save (possibly hours in). Last, because it
        # imports octo (torch): a config failing a check above stays a fast failure.
        from octo.hf_io import parse_size

        try:
            parse_size(self.max_shard_size)
        except ValueError as e:
            raise ConfigError(f"config key {e}") from None

    # ----- JSON and overrides -----------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from a dict; an unknown key names the nearest valid one."""
        _check_keys(cls, d, source)
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
        """Read a JSON config (or start from defaults when path is None) and apply `key=value`
        overrides (values parsed as JSON when they parse, else taken as strings)."""
        d: dict[str, Any] = {}
        if path is not None:
            p = Path(path)
            if p.is_dir():
                raise ConfigError(f"config file {p} is a folder; pass --config PATH to a JSON file")
            if not p.is_file():
                raise ConfigError(
                    f"config file {p} does not exist; pass --config PATH to a JSON file"
                )
            try:
                d = json.loads(p.read_text(encoding="utf-8"))
            except UnicodeDecodeError as e:
                raise ConfigError(
                    f"config file {p} is not UTF-8 text ({e}); save it as UTF-8 JSON"
                ) from None
            except json.JSONDecodeError as e:
                raise ConfigError(f"config file {p} is not valid JSON: {e}") from None
            except OSError as e:
                raise ConfigError(
                    f"config file {p} cannot be read ({e.strerror or e}); pass --config PATH to "
                    "a readable JSON file"
                ) from None
            if not isinstance(d, dict):
                raise ConfigError(f"config file {p} must hold a JSON object of keys")
            mc = d.get("model_config")  # a relative path may be relative to the config's folder
            if isinstance(mc, str) and not Path(mc).exists() and (p.parent / mc).is_file():
                d["model_config"] = str(p.parent / mc)
            if d.get("tokenizer_name") == OWN_TOKENIZER:
                d["tokenizer_name"] = str(p.parent)
        _check_keys(cls, d, str(path))
        sets: dict[str, Any] = {}
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"--set {item!r}: expected key=value")
            key, raw = item.split("=", 1)
            try:
                sets[key.strip()] = json.loads(raw)
            except json.JSONDecodeError:
                sets[key.strip()] = raw
        _check_keys(cls, sets, "--set")
        return cls(**{**d, **sets})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the resolved config (every key, defaults included) as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _check_keys(cls: type, d: dict[str, Any], source: str) -> None:
    """ConfigError for the first key that is not a field, naming the nearest field."""
    names = [f.name for f in dataclasses.fields(cls)]
    for key in d:
        if key not in names:
            near = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
            hint = f"did you mean {near[0]!r}?" if near else "see the README for the valid keys"
            raise ConfigError(f"{source}: unknown key {key!r}; {hint}")


def load_model_config(cfg: TrainConfig, override: str | None = None) -> dict[str, Any]:
    """The model's shape as OctoConfig fields, validated, before any data or model is loaded.

    Source: `override` (--model-config), else cfg.model_config, else the "seed" preset. A JSON
    file (ours or a transformers Llama config.json) keeps its vocab_size when it names one; a
    preset name gives the architecture only; a dict is the fields themselves. vocab_size is None
    when the tokenizer should size it (train.data.resolve_vocab_size). Raises ConfigError (one
    line) for a missing file, an unknown key (nearest valid key named), an impossible shape, or
    block_size > max_position_embeddings.
    """
    from octo.config import PRESETS, OctoConfig  # octo imports torch; only needed from here on

    if cfg.init_from is not None:
        return _init_from_fields(cfg, override)
    source = override if override is not None else cfg.model_config
    if source == "":  # --model-config "" would otherwise mean the seed preset
        raise ConfigError(
            f"model config is an empty string; give a JSON file or one of {', '.join(PRESETS)}"
        )
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


def resolved_model_config(cfg: TrainConfig, fields: dict[str, Any]) -> str | dict[str, Any]:
    """What cfg.model_config should read in the configs a run saves (log folder, checkpoints), so
    that `--config <checkpoint>/train_config.json` rebuilds the same model from any working
    directory, even after the model file was edited or moved: a preset name as it is (its fields
    live in the code), otherwise `fields` (load_model_config's result; vocab_size None when the
    tokenizer sizes it; with init_from, its config.json's fields)."""
    from octo.config import PRESETS

    source = cfg.model_config or "seed"
    preset = isinstance(source, str) and source in PRESETS and cfg.init_from is None
    return source if preset else dict(fields)


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


def add_set_argument(parser: argparse.ArgumentParser) -> None:
    """--set KEY=VALUE, in the forms `python -m train` takes (--set a=1 b=2, repeatable), one
    definition for python -m train, train.prepare and train.tokenizer, so a command line copied
    from one works in the others."""
    parser.add_argument(
        "--set",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override config keys (values parsed as JSON): --set a=1 b=2, repeatable",
    )
