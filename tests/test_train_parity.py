"""The Trainer against a plain PyTorch loop: real text (tinyshakespeare), the real GPT-2 tokenizer,
a tiny model, a few hundred steps, the same batches; the losses must agree within 2%."""

from __future__ import annotations

import math

import pytest
import torch

from octo import OctoConfig, OctoForCausalLM
from train.config import TrainConfig
from train.data import build_eval_batches, build_train_data, load_tokenizer
from train.loop import Trainer
from train.model_config import load_model_config, resolve_vocab_size

STEPS, WARMUP, LR, MIN_RATIO = 200, 20, 3e-3, 0.1


class Recorder:
    """Passes batches through and keeps them, so the plain loop sees exactly the same ones."""

    def __init__(self, data) -> None:
        self.data, self.seen = iter(data), []

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        b = next(self.data)
        self.seen.append(b.clone())
        return b


def plain_loop(model_cfg: OctoConfig, batches, evals, seed: int) -> tuple[list[float], float]:
    """The textbook loop, written out independently of train/: warmup + cosine, AdamW without
    decay on 1-D weights and embeddings, clipping at 1.0, mean loss per batch."""
    torch.manual_seed(seed)
    model = OctoForCausalLM(model_cfg)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": rest, "weight_decay": 0.0}], betas=(0.9, 0.95))  # fmt: skip
    losses = []
    for s, ids in enumerate(batches):
        if s < WARMUP:
            lr = LR * (s + 1) / WARMUP
        else:
            p = (s - WARMUP) / (STEPS - 1 - WARMUP)
            lr = LR * MIN_RATIO + LR * (1 - MIN_RATIO) * 0.5 * (1 + math.cos(math.pi * p))
        for g in opt.param_groups:
            g["lr"] = lr
        loss = model(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    with torch.no_grad():
        ev = sum(model(b, labels=b, reduction="sum").loss.item() for b in evals)
    return losses, ev / sum(b.shape[0] * (b.shape[1] - 1) for b in evals)


@pytest.mark.slow
def test_trainer_matches_plain_loop_on_tinyshakespeare(tmp_path, shared_data, gpt2_tokenizer_dir):
    cfg = TrainConfig(
        dataset_name=str(shared_data / "text" / "tinyshakespeare.txt"),
        tokenizer_name=str(gpt2_tokenizer_dir), eval_split=None, eval_holdout_fraction=0.05,
        block_size=32, batch_size=4, gradient_accumulation_steps=1, max_steps=STEPS,
        weight_decay=0.1,  # the plain loop's
        warmup_steps=WARMUP, learning_rate=LR, min_lr_ratio=MIN_RATIO, num_workers=0,
        eval_max_batches=8, log_interval_steps=STEPS // 4, eval_interval_steps=10**6,
        save_interval_steps=10**6, log_dir=str(tmp_path / "logs"),
        checkpoint_dir=str(tmp_path / "ckpt"), data_cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    tok = load_tokenizer(cfg.tokenizer_name, cache_dir=cfg.data_cache_dir)
    assert len(tok) == 50257
    fields = load_model_config(cfg, "tiny")
    model_cfg = OctoConfig.from_dict({**fields, "vocab_size": resolve_vocab_size(None, tok)})
    data = Recorder(build_train_data(cfg, tok))
    evals = build_eval_batches(cfg, tok)
    tr = Trainer(cfg, model_cfg, train_data=data, eval_data=evals, tokenizer=tok)
    losses = []
    for _ in range(STEPS):  # the Trainer's own step, one batch each
        losses.append(tr.train_step([next(data)]).loss())
    trainer_eval = tr.evaluate()["eval_loss"]
    ref_losses, ref_eval = plain_loop(model_cfg, data.seen, evals, cfg.seed)

    assert losses[0] == pytest.approx(ref_losses[0], rel=1e-6)  # same init, same first batch
    last, ref_last = sum(losses[-20:]) / 20, sum(ref_losses[-20:]) / 20
    assert last < losses[0] - 2.0  # it learned: from ~10.8 (ln 50304) down by > 2 nats
    assert last == pytest.approx(ref_last, rel=0.02)
    assert trainer_eval == pytest.approx(ref_eval, rel=0.02)
