"""optimizer "muon" (train/muon.py): which parameters Muon takes, that the step is exactly
torch.optim.Muon + AdamW on the clipped gradients at the scheduled learning rates, the start and
log lines, and the one-line refusals (a torch without Muon, FSDP2, an AdamW checkpoint).
Resume, non-finite steps and the checkpoint round trip are the AdamW tests run with muon too
(tests/test_train_step.py, tests/test_checkpoint.py); DDP is in tests/test_distributed.py."""

from __future__ import annotations

import re

import pytest
import torch

from octo import OctoConfig, OctoForCausalLM
from tests.fakes import ListData
from tests.test_train_step import HostReads, make_cfg, random_batches
from train.checkpoint import CheckpointError
from train.config import ConfigError, TrainConfig
from train.distributed import DistEnv
from train.loop import Trainer
from train.metrics import format_log_line

VOCAB = 96
MODEL = OctoConfig.preset("tiny", vocab_size=VOCAB, max_position_embeddings=64)
MATRIX = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]|mlp\.(gate|up|down))_proj\.weight")


def muon_cfg(tmp_path, **kw) -> TrainConfig:
    return make_cfg(tmp_path, optimizer="muon", muon_learning_rate=0.02, **kw)


@pytest.mark.parametrize("tied", [False, True])
def test_decoder_matrices_go_to_muon_the_rest_to_adamw(tmp_path, tied):
    model_cfg = OctoConfig.preset("tiny", vocab_size=VOCAB, attention_bias=True,
                                  tie_word_embeddings=tied)  # fmt: skip
    tr = Trainer(muon_cfg(tmp_path), model_cfg)
    names = {id(p): n for n, p in tr.model.named_parameters()}
    opt = tr.optimizer
    muon = [names[id(p)] for g in opt.muon.param_groups for p in g["params"]]
    decay, no_decay = ([names[id(p)] for p in g["params"]] for g in opt.adamw.param_groups)
    assert sorted(muon) == sorted(n for n in names.values() if MATRIX.fullmatch(n))
    assert len(muon) == 7 * model_cfg.num_hidden_layers
    # AdamW: an untied lm_head decays; embeddings, norms and biases (q/k/v biases too) do not
    assert decay == ([] if tied else ["lm_head.weight"])
    assert "model.embed_tokens.weight" in no_decay
    assert any(n.endswith("q_proj.bias") for n in no_decay)
    assert all(not MATRIX.fullmatch(n) for n in decay + no_decay)
    # every parameter exactly once, and the loop clips over all of them
    assert sorted(muon + decay + no_decay) == sorted(names.values())
    assert {id(p) for p in tr._params} == set(names)
    assert opt.param_groups[0] is opt.muon.param_groups[0]  # one set of groups: Muon's first
    assert opt.param_groups[1:] == opt.adamw.param_groups


def test_step_is_torch_muon_and_adamw_on_the_clipped_gradients(tmp_path):
    """Three Trainer steps against torch.optim.Muon and torch.optim.AdamW stepped by hand on the
    same model, batches, loss normalisation, clipping (over the parameters in the loop's order)
    and scheduled lrs: the same weights to the last bit."""
    cfg = muon_cfg(tmp_path, max_grad_norm=0.5, warmup_steps=2, max_steps=3,
                   muon_weight_decay=0.05, muon_momentum=0.9, muon_adamw_lr_scale=1.5)  # fmt: skip
    tr = Trainer(cfg, MODEL)
    torch.manual_seed(cfg.seed)
    ref = OctoForCausalLM(MODEL)
    named = dict(ref.named_parameters())
    matrices = [p for n, p in named.items() if MATRIX.fullmatch(n)]
    decay = [named["lm_head.weight"]]
    rest = [p for n, p in named.items() if not MATRIX.fullmatch(n) and n != "lm_head.weight"]
    muon = torch.optim.Muon(matrices, lr=0.02, momentum=0.9, weight_decay=0.05, nesterov=True)
    adamw = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                               {"params": rest, "weight_decay": 0.0}],
                              betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                              fused=True)  # fmt: skip
    for s, ids in enumerate(random_batches(3)):
        stats = tr.train_step([ids])
        (ref(ids, labels=ids, reduction="sum").loss * (1.0 / stats.n_targets)).backward()
        torch.nn.utils.clip_grad_norm_(matrices + decay + rest, 0.5)
        lr = tr.schedule(s)
        assert stats.lr == lr
        for g in muon.param_groups:
            g["lr"] = lr * 0.02 / cfg.learning_rate
        for g in adamw.param_groups:
            g["lr"] = lr * 1.5
        assert tr.optimizer.param_groups[0]["lr"] == muon.param_groups[0]["lr"]
        assert tr.optimizer.param_groups[-1]["lr"] == adamw.param_groups[-1]["lr"]
        muon.step()
        adamw.step()
        ref.zero_grad()
    for (n, a), b in zip(tr.model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), n


def test_muon_step_reads_the_device_once(tmp_path):
    """Muon has no fused kernel that skips a non-finite step on the device: the skip decision is
    the step's one host read (AdamW's step has none: tests/test_train_step.py)."""
    tr = Trainer(muon_cfg(tmp_path, kernels="torch"), MODEL)
    batches = random_batches(1)
    tr.train_step(batches)
    with HostReads() as reads:
        tr.train_step(batches)
    # the reference cross-entropy's label check is allowed, as for AdamW
    found = [r for r in reads.found if "octo_kernels/cross_entropy.py" not in r]
    assert len(found) == 1 and "train/step.py" in found[0], reads.found


def test_start_and_log_lines_name_the_optimizer(tmp_path):
    lines = {}
    for opt in ("adamw", "muon"):
        cfg = make_cfg(tmp_path / opt, optimizer=opt, max_steps=4, log_interval_steps=2)
        tr = Trainer(cfg, MODEL, train_data=ListData(random_batches(4)))
        tr.fit()
        tr.log.close()
        lines[opt] = tr.log.log_path.read_text().splitlines()
    assert any(line.startswith("Optimizer: AdamW (lr 3.0e-03") for line in lines["adamw"])
    assert not any("muon" in line.lower() for line in lines["adamw"])
    start = [line for line in lines["muon"] if line.startswith("Optimizer: ")]
    assert start and start[0].startswith("Optimizer: Muon for the 14 decoder-layer matrices")
    assert "lr 2.0e-02, momentum 0.95" in start[0]  # the defaults
    assert (
        "AdamW for embeddings, lm_head, norms and biases (0.01M parameters; lr 2.4e-02" in start[0]
    )
    steps = [line for line in lines["muon"] if line.startswith("Step 4:")]
    # one schedule: at step 4 (the last of 4, cosine down to 0.1 x peak) AdamW's lr is
    # 3e-3 x muon_adamw_lr_scale 8 x 0.1, Muon's 0.02 x 0.1
    assert steps and " lr=2.4e-03 muon_lr=2.0e-03 grad_norm=" in steps[0], steps


def test_log_line_shows_muon_lr_after_lr():
    r = {"step": 100, "loss": 8.12344, "ppl": 3378.454, "lr": 3e-4, "grad_norm": 1.0234,
         "tokens_per_s": 1234.0, "muon_lr": 2e-2}  # fmt: skip
    assert format_log_line(r) == (
        "Step 100: loss=8.1234 ppl=3378.45 lr=3.0e-04 muon_lr=2.0e-02 grad_norm=1.02 tok/s=1.2k"
    )


def test_torch_without_muon_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delattr(torch.optim, "Muon")
    with pytest.raises(ConfigError) as e:
        Trainer(muon_cfg(tmp_path), MODEL)
    msg = str(e.value)
    assert "optimizer 'muon' needs torch >= 2.9 (torch.optim.Muon)" in msg and "\n" not in msg
    Trainer(make_cfg(tmp_path), MODEL)  # adamw does not need it


def test_fsdp_is_refused_at_start(tmp_path):
    """Under torchrun with parallelism fsdp: one line before the model is wrapped (checked with a
    stand-in environment: the refusal comes before any collective)."""
    env = DistEnv(rank=0, world_size=2, group=True)
    with pytest.raises(ConfigError, match=r"^optimizer 'muon' with parallelism 'fsdp' is not "):
        Trainer(muon_cfg(tmp_path, parallelism="fsdp"), MODEL, env=env)


def test_resuming_an_adamw_checkpoint_with_muon_is_one_clear_error(tmp_path):
    cfg = make_cfg(tmp_path / "a", max_steps=2)
    tr = Trainer(cfg, MODEL, train_data=ListData(random_batches(2)))
    tr.fit()
    tr.log.close()
    tr2 = Trainer(muon_cfg(tmp_path / "b"), MODEL)
    with pytest.raises(CheckpointError, match="holds AdamW state but the run uses MuonWithAdamW"):
        tr2.resume(tr.last_checkpoint)


def test_state_from_another_torch_release_gets_missing_group_keys(tmp_path):
    """A Muon group saved by a torch whose Muon reads fewer keys (say, no ns_steps) loads, and
    the key takes this torch's default, so the step does not fail on it."""
    tr = Trainer(muon_cfg(tmp_path), MODEL)
    tr.train_step(random_batches(1))
    sd = tr.optimizer.state_dict()
    del sd["param_groups"][0]["ns_steps"], sd["param_groups"][0]["nesterov"]
    tr.optimizer.load_state_dict(sd)
    group = tr.optimizer.muon.param_groups[0]
    assert group["ns_steps"] == 5 and group["nesterov"] is True
    assert group is tr.optimizer.param_groups[0] and tr.optimizer.muon.state is tr.optimizer.state
    tr.train_step(random_batches(1, seed=1))
