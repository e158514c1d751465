"""The model card: README.md of a run's final model folder, and loss.png beside it.

What a person opening the folder (or its model hub page) wants to know: what was trained
(architecture, parameter count, vocabulary), on what data, for how many tokens and steps, the
final train and eval loss, on what hardware and for how long, the command and config that
reproduce it, and how to load it (OctoForCausalLM, transformers, llama.cpp through
`python -m octo.export_gguf`). The numbers come from the run itself (FinalModel: steps, tokens,
model, device) and the newest records its RunLogger wrote (start time, last log line, last
evaluation), so the card says exactly what the log says. The plot is train.plot's, drawn when
matplotlib is installed. The YAML header is what model hubs read (library, task, tags).
"""

from __future__ import annotations

import dataclasses
import datetime
import shlex
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from train.config import TrainConfig
from train.optim import tokens_per_step
from train.plot import plot as draw  # matplotlib itself is imported when drawing (optional)
from train.runtime import Precision, cpu_name

CARD_NAME = "README.md"
PLOT_NAME = "loss.png"


def hardware(device: torch.device, world_size: int) -> str:
    """ "1 x NVIDIA H100 80GB HBM3" or "CPU: Intel(R) Xeon(R) ... (2 threads)"."""
    if device.type == "cuda":
        return f"{world_size} x {torch.cuda.get_device_name(device)}"
    procs = f", {world_size} processes" if world_size > 1 else ""
    return f"CPU: {cpu_name()} ({torch.get_num_threads()} threads{procs})"


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    minutes = f"{s % 3600 // 60:02d}m{s % 60:02d}s"
    return f"{s // 3600}h{minutes}" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _data_line(cfg: Any) -> str:
    evals = (f"eval split {cfg.eval_split!r}" if cfg.eval_split is not None
             else f"{cfg.eval_holdout_fraction:g} of train held out for eval")  # fmt: skip
    return f"`{cfg.dataset_name}` (split {cfg.train_split!r}, {evals}, column {cfg.text_column!r})"


def _hub_header(cfg: Any) -> str:
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags: [llama, octo, text-generation]"]  # fmt: skip
    local = Path(cfg.dataset_name).exists() or cfg.dataset_name == "octo-demo"
    if not local and "*" not in cfg.dataset_name:
        lines.append(f"datasets: [{cfg.dataset_name}]")
    return "\n".join([*lines, "---"])


@dataclasses.dataclass(frozen=True)
class FinalModel:
    """A finished run, as its final folder and model card record it. run() builds it from the
    plain model (gathered from DDP/FSDP2, train.checkpoint.dist.full_model) and its own config
    and Runtime, so the Trainer is read, never rewritten. last: the newest record of each type
    the run's log wrote (RunLogger.last: start, train, eval); jsonl_path: that log's file (the
    plot's data), None when none was written."""

    cfg: TrainConfig
    model: Any  # OctoForCausalLM, not wrapped
    tokenizer: Any | None
    step: int
    tokens_seen: int
    world_size: int
    device: torch.device
    precision: Precision
    last: Mapping[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    jsonl_path: Path | None = None


def _losses(run: FinalModel) -> tuple[str, str]:
    """The final train loss (the last log line's) and eval loss (the last evaluation's) rows."""
    cfg, last = run.cfg, run.last
    resumed = last.get("start", {}).get("step") or 0
    train = last.get("train")
    train_loss = f"not logged (log_interval_steps={cfg.log_interval_steps})"
    if train:  # a log line averages the steps since the previous one (or since the resume)
        first = max(train["step"] - cfg.log_interval_steps, resumed) + 1
        steps = f"step {first}" if first == train["step"] else f"steps {first}-{train['step']}"
        train_loss = f"{train['loss']:.4f} (perplexity {train['ppl']:.2f}), mean of {steps}"
    ev = last.get("eval")
    eval_loss = (f"{ev['eval_loss']:.4f} (perplexity {ev['eval_ppl']:.2f}) at step "
                 f"{ev['step']}, on up to {cfg.eval_max_batches} batches" if ev
                 else "no evaluation ran")  # fmt: skip
    return train_loss, eval_loss


def _optimizer(cfg: TrainConfig) -> str:
    """The optimizer row: which optimizer (with muon, Muon and AdamW, each over its parameters)
    at what peak learning rate, and the one schedule that drives both."""
    schedule = f"{cfg.lr_schedule} schedule, {cfg.warmup_steps} warmup steps"
    if cfg.optimizer == "muon":
        adamw_lr = cfg.learning_rate * cfg.muon_adamw_lr_scale
        return (f"Muon for the decoder layers' matrices (peak learning rate "
                f"{cfg.muon_learning_rate:g}, momentum {cfg.muon_momentum:g}, weight decay "
                f"{cfg.muon_weight_decay:g}), AdamW for the other parameters (peak learning rate "
                f"{adamw_lr:g}, weight decay {cfg.weight_decay:g}); {schedule}")  # fmt: skip
    return (f"AdamW, peak learning rate {cfg.learning_rate:g}, {schedule}, weight decay "
            f"{cfg.weight_decay:g}")  # fmt: skip


def _wall_time(run: FinalModel) -> str:
    start = run.last.get("start", {})
    if "time" not in start:
        return "unknown"
    resumed = start.get("step") or 0
    line = f"{_duration(time.time() - start['time'])} (start of training to final save"
    return line + (f"; this run resumed at step {resumed})" if resumed else ")")


def facts(run: FinalModel) -> list[tuple[str, str]]:
    """The card's table: (row name, what it says), from the run's model, config and log."""
    cfg, model, tok = run.cfg, run.model, run.tokenizer
    c = model.config
    n_params = model.num_parameters()
    tok_line = f"{len(tok):,} tokens of `{cfg.tokenizer_name}`" if tok is not None else "none saved"
    train_loss, eval_loss = _losses(run)
    per_step = tokens_per_step(cfg, run.world_size)
    tied = "tied to the input embedding" if c.tie_word_embeddings else "untied"
    return [
        ("architecture", "Llama (`LlamaForCausalLM`): RMSNorm, rotary embeddings (theta "
         f"{c.rope_theta:g}), grouped-query attention, SwiGLU MLP"),
        ("parameters", f"{n_params:,} ({n_params / 1e6:.2f}M)"),
        ("shape", f"{c.num_hidden_layers} layers, hidden {c.hidden_size}, "
         f"{c.num_attention_heads} heads / {c.num_key_value_heads} KV heads (head dim "
         f"{c.head_dim}), MLP {c.intermediate_size}, output layer {tied}"),
        ("context", f"trained on {cfg.block_size}-token sequences (max_position_embeddings "
         f"{c.max_position_embeddings})"),
        ("vocabulary", f"{c.vocab_size:,} ids; tokenizer: {tok_line}"),
        ("data", _data_line(cfg)),
        ("trained", f"{run.tokens_seen:,} tokens in {run.step:,} optimizer steps "
         f"({per_step:,} tokens per step: {cfg.batch_size} x {cfg.block_size} x "
         f"{cfg.gradient_accumulation_steps} accumulation x {run.world_size} "
         f"process{'es' if run.world_size > 1 else ''})"),
        ("final train loss", train_loss),
        ("final eval loss", eval_loss),
        ("optimizer", _optimizer(cfg)),
        ("hardware", hardware(run.device, run.world_size)),
        ("precision", run.precision.describe()),
        ("wall time", _wall_time(run)),
        ("date", datetime.date.today().isoformat()),
    ]  # fmt: skip


def model_card(run: FinalModel, final: Path, plot: str | None, config: str) -> str:
    """The card's Markdown for `run`, whose final folder is `final` (as the run names it:
    relative when checkpoint_dir is); plot: the PNG's file name beside it, or None; config: the
    text of the folder's train_config.json, shown as it is."""
    cfg = run.cfg
    n_params = run.model.num_parameters()
    f = shlex.quote(str(final))
    ckpt = Path(cfg.checkpoint_dir)
    repro = (f"python -m train --config {f}/train_config.json --set resume_from=null "
             f"checkpoint_dir={shlex.quote(str(ckpt.with_name(ckpt.name + '-repro')))} "
             f"log_dir={shlex.quote(str(Path(cfg.log_dir)) + '-repro')}")  # fmt: skip
    rows = "\n".join(f"| {k} | {v} |" for k, v in facts(run))
    image = f"\n![train and eval loss, and throughput, by step]({plot})\n" if plot else ""
    return f"""{_hub_header(cfg)}

# {ckpt.name}

A {n_params / 1e6:.2f}M-parameter Llama-architecture language model trained from scratch with
Octo. The folder is a transformers Llama checkpoint (config.json + safetensors) with its
tokenizer and the run's whole config (`train_config.json`).

| | |
|---|---|
{rows}
{image}
## Use

```python
from transformers import AutoTokenizer
from octo import OctoForCausalLM

tok = AutoTokenizer.from_pretrained({str(final)!r})
model = OctoForCausalLM.from_pretrained({str(final)!r})
ids = tok("Once upon a time", return_tensors="pt").input_ids
print(tok.decode(model.generate(ids, max_new_tokens=64, temperature=0.8, top_k=50)[0]))

from transformers import LlamaForCausalLM                  # the same weights in transformers
llama = LlamaForCausalLM.from_pretrained({str(final)!r})
```

From the command line: `python -m octo.generate --checkpoint {f} --prompt "Once upon a time"`.

In llama.cpp (and the tools built on it), after exporting a GGUF file:

```bash
pip install gguf                                   # or: pip install 'octo-trainer[gguf]'
python -m octo.export_gguf {f} model.gguf  # --dtype f16 (default), bf16 or f32
llama-completion -m model.gguf -no-cnv -p "Once upon a time" -n 64   # older llama.cpp: llama-cli
```

## Reproduce

From the folder the run started in (its paths are relative to it), with the same data and
tokenizer:

```bash
{repro}
```

<details><summary>train_config.json (the run's resolved config)</summary>

```json
{config.rstrip()}
```

</details>
"""


def write_model_card(run: FinalModel, folder: Path, final: Path) -> None:
    """README.md (and loss.png when matplotlib is installed) into `folder`, the final model's
    folder being written (it becomes `final`), after its train_config.json. The plot is left
    out when it cannot be drawn (no matplotlib, a run log that was not written)."""
    plot = None
    if run.jsonl_path is not None:
        try:
            draw(run.jsonl_path, out=folder / PLOT_NAME)
            plot = PLOT_NAME
        except (ImportError, ValueError, OSError):
            plot = None
    config = (folder / "train_config.json").read_text(encoding="utf-8")
    card = model_card(run, final, plot, config)
    (folder / CARD_NAME).write_text(card, encoding="utf-8")
