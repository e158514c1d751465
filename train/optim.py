"""AdamW with decay only where it belongs, the learning-rate schedule, and the planned step count.

Schedule, for optimizer step s = 0, 1, ... (the s-th update; peak = learning_rate,
floor = peak * min_lr_ratio, W = warmup_steps, S = planned steps):

    s < W:           lr = peak * (s + 1) / W                                  (linear warmup)
    W <= s < S:      p = (s - W) / max(1, S - 1 - W)                          (0 -> 1)
                     cosine:   lr = floor + (peak - floor) * (1 + cos(pi * p)) / 2
                     linear:   lr = peak - (peak - floor) * p
                     constant: lr = peak
    s >= S:          lr = floor (constant: peak)

so the first update after warmup runs at the peak and the last planned update at the floor.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from train.config import ConfigError, TrainConfig
from train.muon import MuonWithAdamW, build_muon, decoder_matrices


def param_groups(
    model: nn.Module, weight_decay: float, exclude: set[int] = frozenset()
) -> list[dict[str, Any]]:
    """Two AdamW groups: matrices of linear layers decay; norms, biases and embeddings (and a
    lm_head tied to the embedding) do not: decaying them pulls scales and token vectors toward
    zero for no regularisation benefit. Each parameter appears once (tied weights shared);
    parameters whose id() is in `exclude` (another optimizer's) in neither."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set(exclude)
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if p.ndim < 2 or id(p) in embeddings else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, device: torch.device
) -> torch.optim.Optimizer:
    """cfg.optimizer "adamw": AdamW over param_groups(model). "muon": train.muon.MuonWithAdamW,
    Muon for the decoder layers' matrices and this AdamW for the other parameters."""
    if cfg.optimizer == "muon":
        matrices = decoder_matrices(model)
        rest = param_groups(model, cfg.weight_decay, exclude={id(p) for p in matrices})
        for g in rest:
            g["lr_scale"] = cfg.muon_adamw_lr_scale
        return build_muon(matrices, _adamw(rest, cfg, device), cfg)
    return _adamw(param_groups(model, cfg.weight_decay), cfg, device)


def _adamw(
    groups: list[dict[str, Any]], cfg: TrainConfig, device: torch.device
) -> torch.optim.AdamW:
    """AdamW over groups, fused (one kernel for all parameters) where torch has it: CUDA and
    CPU. The fused path also skips a step on device when told `found_inf` (no host sync), which the
    loop uses for non-finite steps."""
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    if device.type in ("cuda", "cpu"):
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, ValueError):  # a dtype or device the fused kernel lacks
            pass
    return torch.optim.AdamW(groups, foreach=True, **kwargs)


def apply_hyperparameters(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> None:
    """Re-impose the config's hyperparameters (a resumed optimizer state brings the checkpoint's
    values; the config in force wins). AdamW: betas, eps, weight decay (its group 0 decays, group
    1 does not; with muon also its lr_scale); Muon's groups: momentum, weight decay, lr_scale."""
    muon = isinstance(optimizer, MuonWithAdamW)
    adamw = optimizer.adamw if muon else optimizer
    for i, g in enumerate(adamw.param_groups):
        g["betas"] = (cfg.adam_beta1, cfg.adam_beta2)
        g["eps"] = cfg.adam_eps
        g["weight_decay"] = cfg.weight_decay if i == 0 else 0.0
        if muon:
            g["lr_scale"] = cfg.muon_adamw_lr_scale
    for g in optimizer.muon.param_groups if muon else []:
        g["momentum"] = cfg.muon_momentum
        g["weight_decay"] = cfg.muon_weight_decay
        g["lr_scale"] = cfg.muon_learning_rate / cfg.learning_rate


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The scheduled lr into every group: lr itself, times the group's lr_scale where it has one
    (with muon, Muon's groups: muon_learning_rate / learning_rate; AdamW's: muon_adamw_lr_scale),
    so one schedule drives both."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g["lr_scale"] if "lr_scale" in g else lr


def describe_optimizer(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> str:
    """The start line's words for the optimizer: which, over which parameters, at what peak lr."""

    def count(groups: list[dict[str, Any]]) -> str:
        n = sum(p.numel() for g in groups for p in g["params"])
        return f"{n / 1e6:.2f}M parameters"

    betas = f"betas {cfg.adam_beta1}/{cfg.adam_beta2}"
    if not isinstance(optimizer, MuonWithAdamW):
        fused = ", fused" if optimizer.defaults.get("fused") else ""
        return (f"AdamW (lr {cfg.learning_rate:.1e}, {betas}, weight decay {cfg.weight_decay}"
                f"{fused})")  # fmt: skip
    muon = optimizer.muon.param_groups
    n_matrices = sum(len(g["params"]) for g in muon)
    adamw_lr = cfg.learning_rate * cfg.muon_adamw_lr_scale
    return (
        f"Muon for the {n_matrices} decoder-layer matrices ({count(muon)}; lr "
        f"{cfg.muon_learning_rate:.1e}, momentum {cfg.muon_momentum}, weight decay "
        f"{cfg.muon_weight_decay}) + AdamW for embeddings, lm_head, norms and biases "
        f"({count(optimizer.adamw.param_groups)}; lr {adamw_lr:.1e}, {betas}, weight decay "
        f"{cfg.weight_decay} on untied matrices)"
    )


class LRSchedule:
    """lr(step) by the formula of this module's docstring; stateless apart from its settings
    (the step itself lives in the trainer's state), so resuming needs only the step."""

    def __init__(
        self, peak: float, warmup_steps: int, total_steps: int, kind: str = "cosine",
        min_lr_ratio: float = 0.1,
    ) -> None:  # fmt: skip
        self.peak, self.warmup, self.total = peak, warmup_steps, total_steps
        self.kind, self.floor = kind, peak * min_lr_ratio

    @classmethod
    def from_config(cls, cfg: TrainConfig, total_steps: int) -> LRSchedule:
        return cls(cfg.learning_rate, cfg.warmup_steps, total_steps, cfg.lr_schedule,
                   cfg.min_lr_ratio)  # fmt: skip

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        if self.kind == "constant":
            return self.peak
        if step >= self.total:
            return self.floor
        p = min(1.0, (step - self.warmup) / max(1, self.total - 1 - self.warmup))
        if self.kind == "linear":
            return self.peak - (self.peak - self.floor) * p
        return self.floor + (self.peak - self.floor) * 0.5 * (1.0 + math.cos(math.pi * p))

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "peak": self.peak, "floor": self.floor,
                "warmup_steps": self.warmup, "total_steps": self.total}  # fmt: skip


def schedule_change(saved: Any, schedule: LRSchedule, step: int) -> str | None:
    """The warning line for a resume whose schedule differs from the one the checkpoint was
    trained under (`saved`: its state_dict), in planned steps (max_steps, or num_epochs of the
    data), warmup, kind or floor ratio, naming each change and the learning rate at `step` under
    both; None when they agree (a changed peak learning_rate has its own warning). A saved state
    that is not such a dict (an older or foreign checkpoint) is not compared."""
    try:
        old = LRSchedule(saved["peak"], saved["warmup_steps"], saved["total_steps"],
                         saved["kind"], saved["floor"] / saved["peak"])  # fmt: skip
    except (TypeError, KeyError, ZeroDivisionError):
        return None
    pairs = {
        "planned steps": (old.total, schedule.total),
        "warmup_steps": (old.warmup, schedule.warmup),
        "lr_schedule": (old.kind, schedule.kind),
        "min_lr_ratio": (round(old.floor / old.peak, 6), round(schedule.floor / schedule.peak, 6)),
    }
    changes = [f"{name} {a} -> {b}" for name, (a, b) in pairs.items() if a != b]
    if not changes:
        return None
    return (f"resuming with another learning-rate schedule ({', '.join(changes)}): the learning "
            f"rate at step {step} is {schedule(step):.1e}, the checkpoint's schedule gave "
            f"{old(step):.1e}")  # fmt: skip


def tokens_per_step(cfg: TrainConfig, world_size: int = 1) -> int:
    """Input tokens consumed by one optimizer step, over all processes."""
    return cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps * world_size


def planned_steps(cfg: TrainConfig, train_data: object, world_size: int = 1) -> tuple[int, str]:
    """(optimizer steps the schedule spans, where that number came from): max_steps when set,
    else num_epochs worth of the data: the batches one rank yields per epoch
    (TrainData.batches_per_epoch(), the same on every rank) over the accumulation steps.
    Unknown size (streaming) with no max_steps is a ConfigError saying what to set."""
    if cfg.max_steps is not None:
        return cfg.max_steps, "max_steps"
    count = getattr(train_data, "batches_per_epoch", None)
    batches = count() if callable(count) else None
    if batches is None:
        raise ConfigError(
            "cannot plan the learning-rate schedule: the size of the training data is unknown "
            "(streamed); set max_steps, or set pretokenize: true so the tokens are counted"
        )
    steps = cfg.num_epochs * batches // cfg.gradient_accumulation_steps
    tokens = batches * cfg.batch_size * cfg.block_size * world_size
    per_step = tokens_per_step(cfg, world_size)
    if steps < 1:
        raise ConfigError(
            f"the training data holds {tokens} tokens per epoch, fewer than one step's {per_step} "
            "(batch_size x block_size x gradient_accumulation_steps x processes); lower those or "
            "add data"
        )
    return steps, f"num_epochs={cfg.num_epochs} x {tokens} tokens / {per_step} per step"
