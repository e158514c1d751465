"""Forged and inconsistent checkpoints (issue 14, section 4), and the final model folder's marker.

A forged checkpoint here is one whose files were edited and whose completion marker was then
recomputed (octo.integrity.seal: what a bug, a hand edit or another tool produces), so
every checksum passes. Each edit is one CheckpointError line naming the file and the field (they
were a KeyError or RuntimeError traceback, or a silent resume at the wrong step), and a folder of
checkpoints skips the forged one with a warning.

final/ has the same marker and checksums: octo.generate and OctoForCausalLM.from_pretrained
refuse a changed weight or config.json in one line; transformers still loads the folder, and a
final folder without a marker (written before markers) still loads.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from octo import OctoConfig, OctoForCausalLM
from octo.generate import main as generate_main
from octo.integrity import MARKER_NAME as MARKER
from octo.integrity import seal
from tests.fakes import final_run
from train.checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    resolve_resume,
    save_final_model,
    verify_checkpoint,
)
from train.config import TrainConfig

GPT2_VOCAB = 50257


@pytest.fixture
def two(tmp_path):
    """checkpoint_step_10 and checkpoint_step_20 of a tiny model after AdamW steps, with the
    trainer state a run writes (RNG, data position, counters); (folder, model, optimizer)."""
    from tests.test_checkpoint import make, save, train_steps

    model, opt = make()
    for step in (10, 20):
        train_steps(model, opt, 1)
        data = {"mode": "pretok", "tokens": 999, "block_size": 8, "buffer_size_zero": False,
                "seed": 0, "epoch": 0, "position": step * 2}  # fmt: skip
        state = {"step": step, "epoch": 0, "tokens_seen": step * 16, "nonfinite_skips": 0,
                 "scheduler": {"kind": "cosine"}, "scaler": None, "data": data,
                 "rng": capture_rng_state(), "batch_size": 2, "learning_rate": 1e-3,
                 "world_size": 1}  # fmt: skip
        save(tmp_path, step, model, opt, state=state)
    return tmp_path, model, opt


def reseal(ckpt: Path, step: int | None = None) -> None:
    """Recompute ckpt's completion marker over its files as they are now."""
    (ckpt / MARKER).unlink()
    seal(ckpt, step if step is not None else int(ckpt.name.rsplit("_", 1)[1]))


def edit_state(ckpt: Path, edit, name: str = "trainer_state.json") -> None:
    p = ckpt / name
    state = json.loads(p.read_text())
    edit(state)
    p.write_text(json.dumps(state))
    reseal(ckpt)


def _optimizer_shard(ckpt: Path, key_part: str = "exp_avg") -> tuple[Path, str]:
    """(the optimizer shard holding a 2-D exp_avg, that tensor's key)."""
    for shard in sorted(ckpt.glob("optimizer-*.safetensors")):
        for key, t in load_file(shard).items():
            if key.endswith(key_part) and t.dim() == 2:
                return shard, key
    raise AssertionError("no 2-D optimizer state")


def header_shape_one(ckpt: Path) -> str:
    """The audit's forgery: one tensor's header shape set to [1], its data left as it was."""
    shard, key = _optimizer_shard(ckpt)
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header[key]["shape"] = [1]
    text = json.dumps(header).encode()
    shard.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])
    reseal(ckpt)
    return key


def consistent_shape_one(ckpt: Path) -> str:
    """The same, made consistent: the tensor really is one number now (a valid safetensors)."""
    shard, key = _optimizer_shard(ckpt)
    tensors = load_file(shard)
    tensors[key] = torch.zeros(1)
    save_file(tensors, shard, metadata={"format": "pt"})
    reseal(ckpt)
    return key


@pytest.mark.parametrize(
    "forge, field",
    [
        (lambda c: edit_state(c, lambda s: s.update(rng={})), "'rng.python' is missing"),
        (
            lambda c: edit_state(c, lambda s: s.update(step=5)),
            "'step' is 5 but the checkpoint is of step 20",
        ),
        (
            lambda c: edit_state(c, lambda s: s["rng"].update(torch="AAAA")),
            "'rng.torch' is not a torch CPU generator state",
        ),
        (
            lambda c: edit_state(c, lambda s: s["rng"]["python"][1].pop()),
            "'rng.python' is not a Python random state",
        ),
        (
            lambda c: edit_state(c, lambda s: s["data"].pop("position")),
            "'data.position' is missing",
        ),
        (lambda c: edit_state(c, lambda s: s.update(tokens_seen=-1)), "'tokens_seen' is -1"),
        (
            lambda c: edit_state(c, lambda s: s.update(scaler={"scale": 1.0})),
            "'scaler.growth_factor' is missing",
        ),
        (
            lambda c: edit_state(c, lambda s: s.update(ranks=[None, None])),
            "'ranks' is not a list of world_size (1)",
        ),
        (lambda c: reseal(c, step=5), "checkpoint_complete.json: field 'step' is 5 but the folder"),
        (header_shape_one, "has shape [1] (F32: 4 bytes) but its data is"),
        (
            lambda c: edit_state(c, lambda s: s.update(weight_map={"k": "../x"}), "optimizer.json"),
            "optimizer.json: field 'weight_map' is not a map of tensor keys to optimizer shards",
        ),
    ],  # fmt: skip
    ids=[
        "rng_empty",
        "step_5_in_step_20",
        "rng_torch_short",
        "rng_python_short",
        "data_position_missing",
        "negative_count",
        "scaler_incomplete",
        "ranks_wrong_length",
        "marker_step",
        "optimizer_header_shape_1",
        "optimizer_json_weight_map",
    ],  # fmt: skip
)
def test_forged_checkpoint_is_one_line_naming_file_and_field(two, caplog, forge, field):
    root, model, opt = two
    ckpt = root / "checkpoint_step_20"
    forge(ckpt)
    with pytest.raises(CheckpointError) as e:
        resolve_resume(ckpt)
    msg = str(e.value)
    assert field in msg and "\n" not in msg, msg
    assert str(ckpt) in msg, msg
    with pytest.raises(CheckpointError, match=re.escape(field)):
        load_checkpoint(ckpt, model=model, optimizer=opt)
    with caplog.at_level(logging.WARNING, logger="train.checkpoint"):
        assert resolve_resume(root) == root / "checkpoint_step_10"  # skipped, with a warning
    assert "skipping checkpoint_step_20" in caplog.text and field in caplog.text


def test_consistent_optimizer_state_of_the_wrong_shape_is_named(two):
    """A valid shard whose exp_avg is one number: loading names it and both shapes (AdamW would
    have broadcast it silently: the old check looked at tensors with dimensions only)."""
    root, model, opt = two
    ckpt = root / "checkpoint_step_20"
    key = consistent_shape_one(ckpt)
    verify_checkpoint(ckpt)  # the files are intact: what they hold is wrong
    name, state_key = key.removeprefix("state.").rsplit(".", 1)
    want = tuple(dict(model.named_parameters())[name].shape)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(ckpt, model=model, optimizer=opt)
    assert f"optimizer state {name}.{state_key} has shape (1,), not {want}" in str(e.value)


def test_unforged_checkpoint_still_resumes(two):
    root, model, opt = two
    ckpt = root / "checkpoint_step_20"
    reseal(ckpt)  # a recomputed marker over unchanged files is fine
    assert resolve_resume(root) == ckpt
    assert load_checkpoint(ckpt, model=model, optimizer=opt)["step"] == 20


# ----- final/ ------------------------------------------------------------------------------------


@pytest.fixture
def final(tmp_path, gpt2_tokenizer_dir) -> tuple[Path, OctoForCausalLM]:
    """save_final_model of a tiny model with GPT-2's tokenizer: (final folder, model)."""
    from transformers import AutoTokenizer

    cfg = OctoConfig.preset("tiny", vocab_size=GPT2_VOCAB, tie_word_embeddings=True)
    model = OctoForCausalLM(cfg).eval()
    tok = AutoTokenizer.from_pretrained(str(gpt2_tokenizer_dir))
    train_cfg = TrainConfig(checkpoint_dir=str(tmp_path), max_shard_size="1MB")
    return save_final_model(final_run(train_cfg, model, tok)), model


def test_final_has_a_marker_over_every_file_and_loads_in_transformers(final):
    from transformers import LlamaForCausalLM

    folder, model = final
    marker = json.loads((folder / MARKER).read_text())
    assert marker["kind"] == "model" and marker["format"] == 2
    on_disk = {p.name: p.stat().st_size for p in folder.iterdir() if p.name != MARKER}
    assert marker["files"] == on_disk and set(marker["crc32"]) == set(on_disk)
    assert {"tokenizer.json", "train_config.json", "config.json"} <= set(on_disk)
    x = torch.randint(0, GPT2_VOCAB, (1, 6))
    with torch.no_grad():
        ref = model(x).logits
        assert torch.equal(OctoForCausalLM.from_pretrained(folder)(x).logits, ref)
        llama = LlamaForCausalLM.from_pretrained(folder)
        torch.testing.assert_close(llama(x).logits, ref, rtol=0, atol=1e-5)
    with pytest.raises(CheckpointError, match="final: a model folder .*not a checkpoint"):
        resolve_resume(folder)  # never resumed from: the same line as before it had a marker


def _generate(folder: Path, capsys) -> tuple[int, str]:
    args = ["--checkpoint", str(folder), "--prompt", "Hi", "--max-new-tokens", "2"]
    code = generate_main([*args, "--device", "cpu", "--temperature", "0"])
    return code, capsys.readouterr().err


def _flip(path: Path, at: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["weights", "config"])
def test_damaged_final_is_one_line_and_exit_2(final, capsys, damage):
    folder, _ = final
    assert _generate(folder, capsys) == (0, "")
    if damage == "weights":
        bad = sorted(folder.glob("model-*.safetensors"))[-1]
        _flip(bad)
    else:  # an edit that still parses, of the same size
        bad = folder / "config.json"
        bad.write_text(bad.read_text().replace('"num_hidden_layers": 2', '"num_hidden_layers": 1'))
    code, err = _generate(folder, capsys)
    assert code == 2 and err.startswith(f"error: {bad} does not match its checksum"), err
    assert err.count("\n") == 1, err
    with pytest.raises(ValueError, match="does not match its checksum"):
        OctoForCausalLM.from_pretrained(folder)


def test_final_without_marker_and_with_added_files_still_loads(final, capsys):
    """A file added after the save (a plot) is not the loader's business; a folder without a
    marker (a transformers save, a final folder from before markers) loads unchecked."""
    folder, _ = final
    (folder / "notes.png").write_bytes(b"\x89PNG")
    assert _generate(folder, capsys)[0] == 0
    (folder / MARKER).unlink()
    _flip(sorted(folder.glob("model-*.safetensors"))[-1])  # undetectable without the marker
    assert _generate(folder, capsys)[0] == 0


def test_broken_marker_is_named_not_skipped(final, capsys):
    folder, _ = final
    (folder / MARKER).write_text("{")
    code, err = _generate(folder, capsys)
    assert code == 2 and err.startswith(f"error: {folder / MARKER} is not valid JSON"), err
    assert err.count("\n") == 1, err
