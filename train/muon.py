"""optimizer "muon": torch.optim.Muon for the decoder layers' matrices, AdamW for the rest, as one
optimizer object the loop, the schedule, clipping and the checkpoints treat like AdamW.

Which parameter goes where (names as in transformers' Llama):
    Muon    every 2-D weight in model.layers.N: self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj
            (hidden matrices: their update is orthogonalised, so every direction of the matrix
            moves at the same rate whatever the gradient's spectrum)
    AdamW   embed_tokens, lm_head (tied or not), the norms, biases: a lookup table, the output
            layer and vectors, where an orthogonalised update has no meaning (Muon is defined for
            hidden matrices only; torch.optim.Muon refuses anything not 2-D)

Muon's update, per matrix W (m, n) with gradient G (torch.optim.Muon, nesterov):
    B <- mu B + (1 - mu) G;   U = NS5(G + mu (B - G))  (5 Newton-Schulz iterations in bf16: U ~ the
    orthogonal factor of its input, singular values near 1);   W <- W (1 - lr wd) - lr s U
with s = sqrt(max(1, m / n)) ("original" scaling, Keller Jordan's), so the update's RMS is about
lr / sqrt(n): a muon_learning_rate carries over between widths, unlike AdamW's.

The one schedule (train.optim.LRSchedule, peak = learning_rate) drives both: every group holds an
lr_scale and gets lr(step) * lr_scale (train.optim.set_lr): Muon's muon_learning_rate /
learning_rate, AdamW's muon_adamw_lr_scale (the parameters AdamW keeps did better at a few times
the AdamW-only lr once Muon took the matrices: bench/NOTES.md).

Why one object and not two optimizers: the loop, GradScaler, clipping, step hooks and the
name-keyed checkpoint format (train/checkpoint/optimizer.py) all take one torch.optim.Optimizer.
This one is a real Optimizer whose param_groups ARE the Muon and AdamW groups (the same dicts,
Muon's first) and whose state is shared with both, so state_dict()/load_state_dict() number the
parameters across both, and each parameter's state (Muon: momentum_buffer; AdamW: step, exp_avg,
exp_avg_sq) is saved under its name like AdamW's.

Muon has no fused kernel that skips a non-finite step on the device, so the loop decides on the
host (one device read per step, as for any non-fused optimizer). FSDP2 is refused (check_optimizer):
torch.optim.Muon runs Newton-Schulz on p.grad as it finds it, and under FSDP2 that is a row shard
of the matrix, not the matrix.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from train.config import ConfigError, TrainConfig

MUON_TORCH = "2.9"  # the first torch with torch.optim.Muon
_DECODER_MATRIX = re.compile(r"(^|\.)layers\.\d+\.")


def check_optimizer(cfg: TrainConfig, distributed: bool) -> None:
    """ConfigError (one line, before any data is read) for a Muon run this torch or this
    parallelism cannot do."""
    if cfg.optimizer != "muon":
        return
    if not hasattr(torch.optim, "Muon"):
        raise ConfigError(
            f"optimizer 'muon' needs torch >= {MUON_TORCH} (torch.optim.Muon); this is torch "
            f"{torch.__version__}: upgrade torch or set optimizer to adamw"
        )
    if distributed and cfg.parallelism == "fsdp":
        raise ConfigError(
            "optimizer 'muon' with parallelism 'fsdp' is not supported: Muon's Newton-Schulz step "
            "needs each whole matrix and FSDP2 gives every rank a shard of it; use parallelism "
            "ddp, or optimizer adamw"
        )


def decoder_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The 2-D weights inside the decoder layers (model.layers.N.*), each once, in model order;
    works on the bare model and on its DDP wrapper (names prefixed "module.")."""
    seen: set[int] = set()
    out = []
    for name, p in model.named_parameters():
        if p.requires_grad and p.ndim == 2 and _DECODER_MATRIX.search(name) and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


class MuonWithAdamW(torch.optim.Optimizer):
    """A torch.optim.Muon and a torch.optim.AdamW over disjoint parameters, stepped together (see
    the module docstring). self.muon and self.adamw are the two; their groups are this
    optimizer's param_groups, Muon's first."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer) -> None:
        self.muon, self.adamw = muon, adamw
        # Optimizer.add_param_group keeps each group dict itself, so both see every change (lr).
        super().__init__([*muon.param_groups, *adamw.param_groups], defaults={})
        self._n_muon = len(muon.param_groups)
        self._share()

    def _share(self) -> None:
        """Point both optimizers at this one's groups and state (after __init__, and after
        load_state_dict, which replaces them). A group saved by another torch release may lack a
        key this one's optimizer reads: it gets the optimizer's default."""
        self.muon.param_groups = self.param_groups[: self._n_muon]
        self.adamw.param_groups = self.param_groups[self._n_muon :]
        for opt in (self.muon, self.adamw):
            opt.state = self.state
            for group in opt.param_groups:
                for k, v in opt.defaults.items():
                    group.setdefault(k, v)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "muon" in self.__dict__:
            self._share()

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss


def build_muon(matrices: list[nn.Parameter], adamw: torch.optim.Optimizer,
               cfg: TrainConfig) -> MuonWithAdamW:  # fmt: skip
    """Muon over `matrices` (decoder_matrices of the model: one group, carrying lr_scale) with
    the config's muon_* settings, joined to `adamw` (the other parameters' optimizer)."""
    check_optimizer(cfg, distributed=False)
    group = {"params": matrices, "lr_scale": cfg.muon_learning_rate / cfg.learning_rate}
    muon = torch.optim.Muon([group], lr=cfg.muon_learning_rate, momentum=cfg.muon_momentum,
                            weight_decay=cfg.muon_weight_decay, nesterov=True)  # fmt: skip
    return MuonWithAdamW(muon, adamw)
