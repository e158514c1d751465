"""Stand-ins shared by tests."""

from __future__ import annotations

import torch


class ListData:
    """A TrainData stand-in: fixed batches, with the position as its state."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.batches, self.pos, self.epoch = batches, 0, 0

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self.pos >= len(self.batches):
            raise StopIteration
        self.pos += 1
        return self.batches[self.pos - 1]

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, d: dict) -> None:
        self.pos = d["pos"]


def final_run(cfg, model, tokenizer=None):
    """What train.checkpoint.save_final_model takes (the model card's facts included, see
    train/model_card.py), for a run on CPU that logged nothing."""
    from train.model_card import FinalModel
    from train.runtime import resolve_precision

    cpu = torch.device("cpu")
    return FinalModel(cfg, model, tokenizer, step=0, tokens_seen=0, world_size=1, device=cpu,
                      precision=resolve_precision(cfg, cpu))  # fmt: skip


def randomize_(model: torch.nn.Module, seed: int = 1234) -> torch.nn.Module:
    """Every parameter random (norms around 1, the rest std 0.1; a tied weight once), so a tensor
    in the wrong place shows. In place; returns model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.1
            p.copy_(1 + noise if name.endswith("norm.weight") else noise)
    return model
