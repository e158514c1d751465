"""Unit tests of train/checkpoint/: bit-exact round trip, layout and marker, rotation,
resolve_resume's choices, clear errors (shape mismatch, corrupt files, a full disk).
CPU, tiny model."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pickle
import random
import resource
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

import octo.integrity
from octo import OctoConfig, OctoForCausalLM
from octo.integrity import MARKER_NAME as MARKER
from tests.fakes import final_run
from train.checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    resolve_resume,
    restore_rng_state,
    resume_warnings,
    save_checkpoint,
    verify_checkpoint,
)
from train.config import TrainConfig
from train.muon import build_muon

LOG = "train.checkpoint"


def make(
    seed: int = 0, cfg: OctoConfig | None = None, reverse: bool = False, muon: bool = False, **adam
):
    """A tiny model and an AdamW with the loop's two groups (decay / no decay); muon=True:
    train.muon's Muon for the decoder layers' matrices joined to that AdamW for the rest."""
    torch.manual_seed(seed)
    model = OctoForCausalLM(cfg or OctoConfig.preset("tiny"))
    named = list(model.named_parameters())
    if reverse:  # a different parameter order than the one that was saved
        named = named[::-1]
    matrices = [p for n, p in named if muon and p.dim() == 2 and ".layers." in n]
    named = [(n, p) for n, p in named if not any(p is q for q in matrices)]
    decay = [p for n, p in named if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in named if not (p.dim() >= 2 and "embed" not in n)]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=adam.pop("lr", 1e-3), betas=(0.9, 0.95), **adam)
    if muon:
        opt = build_muon(matrices, opt, TrainConfig(optimizer="muon", learning_rate=1e-3))
    return model, opt


def train_steps(model, opt, n: int, seed: int = 1, device: str = "cpu") -> list[float]:
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(n):
        x = torch.randint(0, model.config.vocab_size, (2, 16), generator=g).to(device)
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def save(root, step, model, opt, keep_last=3, state=None, **kw):
    state = {"step": step, "rng": capture_rng_state()} if state is None else state
    return save_checkpoint(
        root,
        step,
        model=model,
        optimizer=opt,
        trainer_state=state,
        train_config=TrainConfig(),
        keep_last=keep_last,
        max_shard_size=kw.pop("max_shard_size", "400KB"),
        **kw,
    )


@pytest.fixture
def trained():
    model, opt = make()
    train_steps(model, opt, 2)
    return model, opt


# ----- round trip ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "adam",
    [{}, {"amsgrad": True, "lr": torch.tensor(1e-3)}, {"muon": True}],
    ids=["adamw", "amsgrad_tensor_lr", "muon"],
)
def test_round_trip_is_bit_exact(tmp_path, adam):
    model, opt = make(**adam)
    train_steps(model, opt, 3)
    state = {"step": 3, "epoch": 0, "tokens_seen": 96, "scheduler": {"last_epoch": 3}, "rng": None}
    ckpt = save(tmp_path, 3, model, opt, state=state)

    model2, opt2 = make(seed=7, reverse=True, **adam)  # other weights, other parameter order
    assert load_checkpoint(ckpt, model=model2, optimizer=opt2) == state
    for (n, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), n
    names2 = {id(p): n for n, p in model2.named_parameters()}
    params2 = {n: p for n, p in model2.named_parameters()}
    for n, p in model.named_parameters():
        s1, s2 = opt.state[p], opt2.state[params2[n]]
        assert s1.keys() == s2.keys() and s1, n
        for k in s1:
            assert torch.equal(s1[k], s2[k]) and s1[k].dtype == s2[k].dtype, (n, k)
    for g1, g2 in zip(opt.param_groups, opt2.param_groups):
        h1 = {k: v for k, v in g1.items() if k != "params"}
        h2 = {k: v for k, v in g2.items() if k != "params"}
        assert h1.keys() == h2.keys()
        for k in h1:
            same = torch.equal(h1[k], h2[k]) if torch.is_tensor(h1[k]) else h1[k] == h2[k]
            assert same and type(h1[k]) is type(h2[k]), k
        assert {names2[id(p)] for p in g2["params"]} == {
            n for n, p in model.named_parameters() if any(p is q for q in g1["params"])
        }
    # The continuation is the same to the last bit: nothing of the optimizer was lost.
    assert train_steps(model, opt, 2, seed=5) == train_steps(model2, opt2, 2, seed=5)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_round_trip_on_gpu_with_fused_adamw(tmp_path):
    """CUDA parameters and fused AdamW (its step counters live on the GPU): saved from device
    memory shard by shard, loaded back onto the device bit-exactly; the next update is equal."""
    model, _ = make()
    model.cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    train_steps(model, opt, 2, device="cuda")
    ckpt = save(tmp_path, 2, model, opt)
    model2, _ = make(seed=9)
    model2.cuda()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3, fused=True)
    load_checkpoint(ckpt, model=model2, optimizer=opt2)
    for (n, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert b.is_cuda and torch.equal(a, b), n
    for p, q in zip(model.parameters(), model2.parameters()):
        for k in opt.state[p]:
            s1, s2 = opt.state[p][k], opt2.state[q][k]
            assert s1.device == s2.device and torch.equal(s1, s2), k
    # One more update from the same gradients (elementwise, so deterministic on the GPU, unlike an
    # attention backward): equal state gives equal parameters.
    for p, q in zip(model.parameters(), model2.parameters()):
        g = torch.Generator("cuda").manual_seed(p.numel())
        p.grad = torch.randn(p.shape, generator=g, device="cuda")
        q.grad = p.grad.clone()
    opt.step()
    opt2.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_compiled_model_saves_clean_names_and_loads(tmp_path, trained):
    model, opt = trained
    ckpt = save(tmp_path, 2, torch.compile(model), opt)  # wrapper only; nothing is compiled
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    assert not any("_orig_mod" in k for k in index["weight_map"])
    meta = json.loads((ckpt / "optimizer.json").read_text())
    assert set(meta["state"]) == {n for n, _ in model.named_parameters()}
    model2, opt2 = make(seed=3)
    load_checkpoint(ckpt, model=torch.compile(model2), optimizer=opt2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


def test_folder_is_self_contained(tmp_path, trained, gpt2_tokenizer_dir):
    """The layout of DESIGN.md; loads with OctoForCausalLM, transformers' Llama and tokenizer."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    model, opt = trained
    tok = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)
    ckpt = save(tmp_path, 2, model, opt, tokenizer=tok)
    assert ckpt.name == "checkpoint_step_2" and [p.name for p in tmp_path.iterdir()] == [ckpt.name]
    names = {p.name for p in ckpt.iterdir()}
    for f in ("config.json", "model.safetensors.index.json", "optimizer.json", "train_config.json",
              "trainer_state.json", "tokenizer.json", "tokenizer_config.json", MARKER):  # fmt: skip
        assert f in names, f
    assert any(n.startswith("model-00001-of-") for n in names)
    assert any(n.startswith("optimizer-00001-of-") for n in names)
    marker = json.loads((ckpt / MARKER).read_text())
    assert marker["step"] == 2
    assert marker["files"] == {p.name: p.stat().st_size for p in ckpt.iterdir() if p.name != MARKER}
    assert (
        TrainConfig.from_dict(json.loads((ckpt / "train_config.json").read_text())) == TrainConfig()
    )

    octo = OctoForCausalLM.from_pretrained(ckpt)
    llama = LlamaForCausalLM.from_pretrained(ckpt)
    x = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        ref = model.eval()(x).logits
        assert torch.equal(octo(x).logits, ref)
        torch.testing.assert_close(llama(x).logits, ref, rtol=0, atol=1e-5)
    assert AutoTokenizer.from_pretrained(ckpt)("Hello world")["input_ids"] == [15496, 995]


def test_load_into_other_dtype_casts(tmp_path, trained):
    """Parameters that cannot take the file's bytes directly (here bf16 ones) get a cast copy."""
    model, opt = trained
    ckpt = save(tmp_path, 2, model, opt)
    other, _ = make(seed=3)
    other.to(torch.bfloat16)
    load_checkpoint(ckpt, model=other, optimizer=None)
    for (n, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert b.dtype == torch.bfloat16 and torch.equal(a.to(torch.bfloat16), b), n


def test_rng_state_round_trip():
    state = json.loads(json.dumps(capture_rng_state()))  # JSON-safe and lossless
    draws = (random.random(), np.random.rand(3).tolist(), torch.rand(3), torch.randn(2))
    random.random(), np.random.rand(5), torch.rand(7)  # move every generator on
    restore_rng_state(state)
    again = (random.random(), np.random.rand(3).tolist(), torch.rand(3), torch.randn(2))
    assert draws[:2] == again[:2]
    assert torch.equal(draws[2], again[2]) and torch.equal(draws[3], again[3])


def test_grad_scaler_state_round_trips_through_trainer_state(tmp_path, trained):
    """The scaler's state travels in trainer_state.json: its scale must come back exactly."""
    model, opt = trained
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=3)
    scaler.scale(torch.tensor(1.0))
    for p in model.parameters():
        p.grad = torch.full_like(p, float("inf"))
    scaler.step(opt)  # inf grads: the step is skipped and the scale backs off
    scaler.update()
    opt.zero_grad()
    ckpt = save(tmp_path, 2, model, opt, state={"step": 2, "scaler": scaler.state_dict()})
    state = load_checkpoint(ckpt, model=model, optimizer=opt)
    scaler2 = torch.amp.GradScaler("cpu")
    scaler2.load_state_dict(state["scaler"])
    assert scaler2.state_dict() == scaler.state_dict() and scaler.get_scale() == 2.0**15
    assert scaler2.get_scale() == scaler.get_scale()


def test_nothing_is_unpickled(tmp_path, trained, monkeypatch):
    model, opt = trained
    save(tmp_path, 2, model, opt)

    def refuse(*a, **k):
        raise AssertionError("unpickling")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    load_checkpoint(resolve_resume(tmp_path), model=model, optimizer=opt)


# ----- rotation and atomicity ---------------------------------------------------------------------


def test_keep_last_rotation_and_stale_cleanup(tmp_path, trained, caplog):
    model, opt = trained
    stale = tmp_path / "checkpoint_step_9.tmp"
    stale.mkdir(parents=True)
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"partial")
    for step in range(1, 6):
        save(tmp_path, step, model, opt, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_step_4", "checkpoint_step_5"]
    assert any("checkpoint_step_9.tmp" in r.getMessage() for r in caplog.records if r.name == LOG)
    # A save at a lower step (a run resumed from an older checkpoint) is kept, being the newest
    # written, and so are the checkpoints with higher steps (a later point of this or another
    # run: removing them would lose work); a same-step save replaces the folder.
    save(tmp_path, 3, model, opt, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"checkpoint_step_{s}" for s in (3, 4, 5)]
    save(tmp_path, 3, model, opt, keep_last=2, state={"step": 3, "again": True})
    assert load_checkpoint(tmp_path / "checkpoint_step_3", model=model, optimizer=opt) == {
        "step": 3,
        "again": True,
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"checkpoint_step_{s}" for s in (3, 4, 5)]


def test_resumed_run_never_rotates_out_a_newer_checkpoint(tmp_path, trained):
    """Audit finding 5: resume_from=checkpoint_step_10 into the same folder with keep_last=1 used
    to delete checkpoint_step_20 at the first save. Only checkpoints older than the save rotate."""
    model, opt = trained
    for step in (10, 20):
        save(tmp_path, step, model, opt, keep_last=2)
    for step in (12, 14):  # the resumed run
        save(tmp_path, step, model, opt, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint_step_14",
        "checkpoint_step_20",
    ]
    save(tmp_path, 22, model, opt, keep_last=1)  # past it: ordinary rotation again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_step_22"]


def test_unsaveable_trainer_state_is_a_clear_error(tmp_path, trained):
    model, opt = trained
    save(tmp_path, 1, model, opt)
    with pytest.raises(CheckpointError, match="trainer_state.json: .*Tensor"):
        save(tmp_path, 2, model, opt, state={"loss": torch.tensor(1.0)})
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_step_1"]


def _enospc(monkeypatch, where: str):
    """Make one write of a save fail as a full disk does: half the bytes land, then the error
    each writer really raises (safetensors: SafetensorError naming "os error 28"; Python's own
    writes: OSError ENOSPC)."""
    import safetensors.torch
    from safetensors import SafetensorError

    def partial(path, nbytes=1000):
        with open(path, "wb") as f:
            f.write(b"\0" * nbytes)

    if where in ("model_shard", "optimizer_shard"):  # both are written by octo.hf_io's helper
        real_save_file = safetensors.torch.save_file
        prefix = "model-" if where == "model_shard" else "optimizer-"

        def save_file(tensors, path, **kw):
            if not Path(path).name.startswith(prefix):
                return real_save_file(tensors, path, **kw)
            partial(path)
            raise SafetensorError(
                "Error while serializing: I/O error: No space left on device (os error 28)"
            )

        monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    else:  # the marker: everything else written
        real = octo.integrity.write_json

        def write_json(path, obj):
            if path.name == MARKER:
                partial(path, 10)
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            real(path, obj)

        monkeypatch.setattr(octo.integrity, "write_json", write_json)


@pytest.mark.parametrize("where", ["model_shard", "optimizer_shard", "marker"])
def test_full_disk_is_one_clear_error_and_leaves_no_trace(tmp_path, trained, monkeypatch, where):
    model, opt = trained
    first = save(tmp_path, 1, model, opt, keep_last=1)
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    train_steps(model, opt, 1)
    with monkeypatch.context() as mp:
        _enospc(mp, where)
        with pytest.raises(CheckpointError) as e:
            save(tmp_path, 2, model, opt, keep_last=1)
    msg = str(e.value)
    assert "\n" not in msg and "No space left on device" in msg and "free disk space" in msg
    assert "checkpoint_step_2" in msg and "earlier checkpoints are intact" in msg
    assert msg.endswith(f"(newest: {first})"), msg
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_step_1"]  # no temp folder
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert resolve_resume(tmp_path) == first
    save(tmp_path, 2, model, opt, keep_last=1)  # the disk has room again: saving works
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_step_2"]


def test_first_save_on_a_full_disk_claims_no_earlier_checkpoint(tmp_path, trained, monkeypatch):
    """With nothing saved before, a failed first save (or final model save) says so: it said
    "earlier checkpoints are intact" when there were none."""
    from train.checkpoint import save_final_model

    model, opt = trained
    with monkeypatch.context() as mp:
        _enospc(mp, "model_shard")
        with pytest.raises(CheckpointError) as e:
            save(tmp_path, 1, model, opt)
        run = final_run(TrainConfig(checkpoint_dir=str(tmp_path)), model)
        with pytest.raises(CheckpointError) as final_error:
            save_final_model(run)
    for msg in (str(e.value), str(final_error.value)):
        assert msg.endswith("was removed; no checkpoint was saved before this one"), msg
        assert "intact" not in msg and "\n" not in msg, msg
    assert not any(tmp_path.iterdir())


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """Writes past nbytes fail with EFBIG in this process (RLIMIT_FSIZE, SIGXFSZ ignored): a real
    write error from the real writers (safetensors' Rust code included), where a full disk
    cannot be made on a test machine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_real_write_error_in_a_shard_is_one_clear_error(tmp_path, trained):
    """safetensors' own failed write (not a stand-in) comes out as one CheckpointError line with
    the system's reason and the fix; the earlier checkpoint is untouched."""
    model, opt = trained
    first = save(tmp_path, 1, model, opt, keep_last=1)
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    biggest = max(p.stat().st_size for p in first.glob("*.safetensors"))
    with file_size_limit(biggest // 2), pytest.raises(CheckpointError) as e:
        save(tmp_path, 2, model, opt, keep_last=1)
    msg = str(e.value)
    assert "\n" not in msg and "File too large" in msg and "ulimit -f" in msg, msg
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_step_1"]
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before


def test_final_model_write_error_keeps_the_previous_final(tmp_path, trained):
    """save_final_model: a failed write is one CheckpointError line, no final.tmp is left, and a
    final folder from before stays whole."""
    from train.checkpoint import save_final_model

    model, _ = trained
    cfg = TrainConfig(checkpoint_dir=str(tmp_path), max_shard_size="400KB")
    run = final_run(cfg, model)
    final = save_final_model(run)
    before = {p.name: p.read_bytes() for p in final.iterdir()}
    with file_size_limit(1000), pytest.raises(CheckpointError) as e:
        save_final_model(run)
    assert "\n" not in str(e.value) and "final model" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert {p.name: p.read_bytes() for p in final.iterdir()} == before
    assert save_final_model(run) == final  # room again: the folder is replaced
    shutil.move(final, tmp_path / "final.old")  # a crash between replace_folder's renames
    assert save_final_model(run) == final and not (tmp_path / "final.old").exists()


def test_crash_while_replacing_a_checkpoint_keeps_it(tmp_path, trained):
    """A save of step N over an existing checkpoint_step_N renames the old one aside, then the new
    one in: a crash between the two leaves .old and .tmp, both complete, and no step N. The next
    resume and the next save restore .old instead of skipping or deleting it."""
    model, opt = trained
    save(tmp_path, 2, model, opt)
    four = save(tmp_path, 4, model, opt)
    before = {p.name: p.read_bytes() for p in four.iterdir()}
    shutil.copytree(four, tmp_path / "checkpoint_step_4.tmp")
    os.rename(four, tmp_path / "checkpoint_step_4.old")
    assert resolve_resume(tmp_path) == four
    assert {p.name: p.read_bytes() for p in four.iterdir()} == before
    os.rename(four, tmp_path / "checkpoint_step_4.old")
    save(tmp_path, 6, model, opt)  # a save cleans up: it must restore, not delete
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint_step_2", "checkpoint_step_4", "checkpoint_step_6"
    ]  # fmt: skip


# ----- resolve_resume -----------------------------------------------------------------------------


@pytest.fixture
def three(tmp_path, trained):
    """A folder with checkpoint_step_1..3 (several model and optimizer shards each)."""
    model, opt = trained
    for step in (1, 2, 3):
        save(tmp_path, step, model, opt)
    return tmp_path


def test_resolve_parent_folder_and_seed_spelling(three):
    assert resolve_resume(three) == three / "checkpoint_step_3"
    assert resolve_resume(str(three / "checkpoint_step_2")) == three / "checkpoint_step_2"
    assert resolve_resume(three / "checkpoint_step_2.pt") == three / "checkpoint_step_2"


def _warnings(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == LOG and r.levelno >= 30)


def _shard(ckpt, kind="model", last=True):
    return sorted(ckpt.glob(f"{kind}-*.safetensors"))[-1 if last else 0]


def _truncate(ckpt):
    p = _shard(ckpt)
    p.write_bytes(p.read_bytes()[:-100])
    return p


def _corrupt_json(ckpt, name="trainer_state.json"):
    p = ckpt / name
    p.write_bytes(b"{" * p.stat().st_size)  # same size: only parsing can tell
    return p


def _flip_tensor_byte(ckpt, kind="model"):
    """Flip one bit in the tensor data (past the header): sizes and headers stay valid."""
    p = _shard(ckpt, kind)
    data = bytearray(p.read_bytes())
    data[-1000] ^= 0x10
    p.write_bytes(bytes(data))
    return p


def _stap(ckpt):
    """The audit's same-size edit: "step" -> "stap" in trainer_state.json."""
    p = ckpt / "trainer_state.json"
    p.write_text(p.read_text().replace('"step"', '"stap"'))
    return p


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda c: _truncate(c), "bytes, expected"),
        (lambda c: _flip_tensor_byte(c), "does not match its checksum"),
        (lambda c: _flip_tensor_byte(c, "optimizer"), "does not match its checksum"),
        (lambda c: _stap(c), "does not match its checksum"),
        (lambda c: (p := _shard(c)).unlink() or p, "missing"),
        (lambda c: _corrupt_json(c), "not valid JSON"),
        (lambda c: _corrupt_json(c, "optimizer.json"), "not valid JSON"),
        (lambda c: (c / MARKER).unlink() or c, "never finished"),
    ],
    ids=[
        "truncated_shard",
        "bit_flip_in_model_data",
        "bit_flip_in_optimizer_data",
        "same_size_json_edit",
        "missing_shard",
        "bad_trainer_state",
        "bad_optimizer_json",
        "no_marker",
    ],
)
def test_corrupt_newest_is_skipped_but_explicit_is_an_error(three, caplog, damage, why):
    newest = three / "checkpoint_step_3"
    bad = damage(newest)
    (three / "checkpoint_step_4.tmp").mkdir()  # an interrupted save: skipped too
    with caplog.at_level(logging.WARNING, logger=LOG):
        assert resolve_resume(three) == three / "checkpoint_step_2"
    warned = _warnings(caplog)
    assert "checkpoint_step_4.tmp" in warned and "checkpoint_step_3" in warned and why in warned
    with pytest.raises(CheckpointError, match=why) as e:
        resolve_resume(newest)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="interrupted save"):
        resolve_resume(three / "checkpoint_step_4.tmp")


def test_same_size_bit_flip_in_a_shard_header_is_caught(three):
    p = _shard(three / "checkpoint_step_3", "optimizer", last=False)
    data = bytearray(p.read_bytes())
    data[8] = ord("[")  # the header's first byte: its JSON no longer parses
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=p.name):
        verify_checkpoint(p.parent)
    assert resolve_resume(three) == three / "checkpoint_step_2"


def _drop_checksums(ckpt):
    """Make ckpt look like a checkpoint written before checksums (marker format 1)."""
    marker = json.loads((ckpt / MARKER).read_text())
    for key in ("crc32", "crc32_chunk"):
        del marker[key]
    (ckpt / MARKER).write_text(json.dumps({**marker, "format": 1}))


def test_checkpoint_without_checksums_still_loads(three, trained):
    model, opt = trained
    ckpt = three / "checkpoint_step_3"
    _drop_checksums(ckpt)
    assert resolve_resume(three) == ckpt
    assert load_checkpoint(ckpt, model=model, optimizer=opt)["step"] == 3
    # Without checksums a same-size edit is caught by the trainer_state field check, one line
    # naming the file and the field (it was a KeyError deep in the trainer).
    _stap(ckpt)
    with pytest.raises(CheckpointError, match="trainer_state.json has no 'step' field") as e:
        resolve_resume(ckpt)
    assert "\n" not in str(e.value)
    assert resolve_resume(three) == three / "checkpoint_step_2"


@pytest.mark.parametrize(
    "state, why",
    [
        ([1], "not an object"),
        ({"step": "3"}, "'step' is '3', not int"),
        ({"step": 3, "rng": 1}, "'rng'"),
    ],
)
def test_trainer_state_fields_are_checked(tmp_path, trained, state, why):
    model, opt = trained
    ckpt = save(tmp_path, 3, model, opt, state=state)
    with pytest.raises(CheckpointError, match=why):
        verify_checkpoint(ckpt)


def test_load_verifies_checksums_once_per_unchanged_folder(three, trained, monkeypatch):
    """resolve_resume then load_checkpoint: the bytes are checksummed once, not twice; a folder
    changed since is checked again."""
    model, opt = trained
    calls = []
    real = octo.integrity.checksum_mismatch
    monkeypatch.setattr(
        octo.integrity, "checksum_mismatch", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    ckpt = resolve_resume(three)
    load_checkpoint(ckpt, model=model, optimizer=opt)
    assert len(calls) == 1
    _flip_tensor_byte(ckpt)
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(ckpt, model=model, optimizer=opt)


def test_from_pretrained_checks_a_checkpoint_folders_checksums(three):
    from octo.hf_io import from_pretrained

    ckpt = three / "checkpoint_step_3"
    assert from_pretrained(OctoForCausalLM, ckpt) is not None
    _flip_tensor_byte(ckpt)
    with pytest.raises(ValueError, match="does not match its checksum"):
        from_pretrained(OctoForCausalLM, ckpt)
    (ckpt / MARKER).unlink()  # no marker (e.g. a transformers save): loads, unchecked
    assert from_pretrained(OctoForCausalLM, ckpt) is not None


def test_nothing_to_resume_from(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint_step_N folder"):
        resolve_resume(tmp_path / "empty")
    (tmp_path / "final").mkdir()  # a final model: weights, no trainer state
    (tmp_path / "final" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="final: a model folder .*empty checkpoint_dir"):
        resolve_resume(tmp_path / "final")
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_resume(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_resume(tmp_path / "checkpoint_step_5.pt")
    (tmp_path / "checkpoint_step_5.pt").write_bytes(b"\x80\x04")  # a seed-era pickle
    with pytest.raises(CheckpointError, match="never unpickles"):
        resolve_resume(tmp_path / "checkpoint_step_5.pt")


# ----- resuming into a different run --------------------------------------------------------------


def test_different_model_shape_names_tensor_and_shapes(tmp_path, trained):
    model, opt = trained
    ckpt = save(tmp_path, 2, model, opt)
    other, other_opt = make(cfg=OctoConfig.preset("tiny", intermediate_size=128))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(ckpt, model=other, optimizer=other_opt)
    msg = str(e.value)
    assert "tensor model.layers.0.mlp.gate_proj.weight has shape (176, 64)" in msg, msg
    assert "the model's has (128, 64)" in msg and "\n" not in msg, msg
    deeper, deeper_opt = make(cfg=OctoConfig.preset("tiny", num_hidden_layers=3))
    with pytest.raises(CheckpointError, match="model.layers.2.* is missing"):
        load_checkpoint(ckpt, model=deeper, optimizer=deeper_opt)


def test_resume_warnings_give_both_numbers():
    state = {"batch_size": 16, "learning_rate": 3e-4, "world_size": 1}
    assert resume_warnings(state, batch_size=16, learning_rate=3e-4) == []
    lines = resume_warnings(state, batch_size=8, learning_rate=1e-3)
    assert len(lines) == 2
    assert "batch_size=8" in lines[0] and "16" in lines[0]
    assert "learning_rate=0.001" in lines[1] and "0.0003" in lines[1]
