"""TrainConfig: every key of train/config.json, typed, with defaults, validated before any run.

The seed's keys come first and mean what the seed's guide says; the keys after them have defaults
and are documented in the README. A bad key or value raises ConfigError, one line naming the key,
the value and the fix (the checks: train/config_check.py); `python -m train` turns it into exit
code 2. A TrainConfig is frozen: checked once, when it is built, and never rewritten after; a
changed config is a new value (dataclasses.replace, which checks it again).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from train.config_check import check_keys, check_values, typed_values
from train.errors import ConfigError

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


@dataclasses.dataclass(frozen=True)
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
        0.02,
        "Muon's peak lr, on learning_rate's warmup and decay (Muon's lr = the scheduled lr x "
        "muon_learning_rate / learning_rate)",
    )
    muon_adamw_lr_scale: float = key(
        8.0,
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

    def validate(self) -> None:
        """Type, range and choice checks (train/config_check.py). Raises ConfigError with a
        one-line message. A float key given an int (JSON's 0) holds it as a float from here: the
        one write to a frozen TrainConfig, made while it is built, before anyone holds it."""
        for name, value in typed_values(self).items():
            object.__setattr__(self, name, value)
        check_values(self)

    # ----- JSON and overrides -----------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from a dict; an unknown key names the nearest valid one."""
        check_keys(cls, d, source)
        return cls(**d)

    @classmethod
    def load(
        cls, path: str | Path | None, overrides: list[str] = (), model_config: str | None = None
    ) -> TrainConfig:
        """Read a JSON config (or start from defaults when path is None) and apply `key=value`
        overrides (values parsed as JSON when they parse, else taken as strings). model_config
        (python -m train's --model-config: a JSON file or a preset name), when given, replaces
        the model_config that the file and the overrides set, once both passed their checks."""
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
        check_keys(cls, d, str(path))
        sets: dict[str, Any] = {}
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"--set {item!r}: expected key=value")
            key, raw = item.split("=", 1)
            try:
                sets[key.strip()] = json.loads(raw)
            except json.JSONDecodeError:
                sets[key.strip()] = raw
        check_keys(cls, sets, "--set")
        cfg = cls(**{**d, **sets})
        if model_config is None:
            return cfg
        if model_config == "":  # would read as no model_config: the seed preset
            raise empty_model_config_error()
        return dataclasses.replace(cfg, model_config=model_config)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the resolved config (every key, defaults included) as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def empty_model_config_error() -> ConfigError:
    """The error for a model config given as "" (--model-config "", or load_model_config's
    override): one wording wherever it is caught."""
    from octo.config import PRESETS  # octo imports torch: on this error only

    return ConfigError(
        f"model config is an empty string; give a JSON file or one of {', '.join(PRESETS)}"
    )


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
