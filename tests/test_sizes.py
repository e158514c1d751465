"""Sizes checked before anything is allocated (octo/memory.py, octo/hf_index.py): a training
config, a checkpoint's config.json and a generation length that cannot fit are refused in one
line, with the estimate and what is free, in a moment, without building the model or the data.
The sizes asked for here are far beyond any machine's memory (petabytes and more), so the
refusals do not depend on the machine that runs the tests, and nothing large is allocated."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

import octo.memory
from octo import OctoConfig, OctoForCausalLM
from octo.hf_io import from_pretrained
from octo.memory import (
    TooLargeError,
    available_bytes,
    check_fits,
    format_bytes,
    kv_cache_bytes,
    training_bytes,
)
from train.__main__ import main

TINY = OctoConfig.preset("tiny")


@pytest.mark.parametrize(
    "overrides",
    [{}, {"tie_word_embeddings": True}, {"attention_bias": True, "num_key_value_heads": 4}],
    ids=["untied", "tied", "bias"],
)
def test_config_shapes_are_the_built_models(overrides):
    """OctoConfig's arithmetic (what the checks use) agrees with the modules octo/model.py
    builds: names, shapes, counts."""
    cfg = OctoConfig.preset("tiny", **overrides)
    model = OctoForCausalLM(cfg)
    stored = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        del stored["lm_head.weight"]
    assert dict(cfg.weight_shapes()) == stored
    assert cfg.num_weights() == len(stored)
    assert cfg.num_parameters() == model.num_parameters()
    for name, shape in stored.items():
        assert cfg.weight_shape(name) == shape
    for name in ("model.layers.2.mlp.up_proj.weight", "model.layers.01.mlp.up_proj.weight",
                 "model.layers.0.mlp.nope.weight", "lm_head.bias"):  # fmt: skip
        assert cfg.weight_shape(name) is None, name
    assert OctoConfig.preset("seed", vocab_size=16000).num_parameters() == 127_224_576


def test_estimates_and_the_check():
    cfg = OctoConfig.preset("seed", vocab_size=16000)
    n = cfg.num_parameters()
    assert training_bytes(cfg) == 16 * n
    assert training_bytes(cfg, shards=8) == 4 * n  # FSDP: the whole model is built first
    assert training_bytes(cfg, shards=2) == 8 * n
    # 12 layers x keys and values x 3 rows x 3 KV heads x 100 positions x 64 dims x 2 bytes
    assert kv_cache_bytes(cfg, 3, 100, torch.bfloat16) == 12 * 2 * 3 * 3 * 100 * 64 * 2
    free = available_bytes("cpu")
    assert isinstance(free, int) and 0 < free <= os.sysconf("SC_PHYS_PAGES") * os.sysconf(
        "SC_PAGE_SIZE"
    )
    check_fits(1, "cpu", "one byte", "nothing")
    with pytest.raises(TooLargeError) as e:
        check_fits(10**18, "cpu", "a thing", "make it smaller")
    msg = str(e.value)
    assert msg.startswith("a thing needs about 1,000 PB on cpu but "), msg
    assert f"but {format_bytes(free)[:2]}" in msg and "available; make it smaller" in msg, msg
    assert format_bytes(1234567890) == "1.23 GB" and format_bytes(999) == "999 B"


# ----- training: refused before the data or the model are built ----------------------------------


def run_train(tmp_path, corpus, capsys, model: dict, **keys) -> tuple[int, str, float]:
    """main() on the stories corpus, pre-tokenizing (a late check would tokenize first), with
    the model config `model` (tiny's fields with changes); (exit code, stderr, seconds)."""
    fields = {k: v for k, v in TINY.to_dict().items() if k != "vocab_size"}  # the tokenizer's
    (tmp_path / "model.json").write_text(json.dumps({**fields, **model}))
    cfg = {"dataset_name": str(corpus["data"]), "tokenizer_name": str(corpus["tokenizer"]),
           "log_dir": str(tmp_path / "logs"), "checkpoint_dir": str(tmp_path / "ckpt"),
           "data_cache_dir": str(tmp_path / "cache"), "block_size": 64, "batch_size": 2,
           "pretokenize": True, "max_steps": 2, **keys}  # fmt: skip
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    t0 = time.perf_counter()
    args = ["--config", str(tmp_path / "c.json"), "--model-config", str(tmp_path / "model.json")]
    rc = main(args)
    return rc, capsys.readouterr().err.strip(), time.perf_counter() - t0


@pytest.mark.parametrize(
    "model, keys, needle, fix",
    [
        # q_proj alone: 10**14 parameters (9.6 PB to train)
        (dict(hidden_size=10**7, num_attention_heads=4, num_key_value_heads=2), {},
         "weights, gradients and AdamW state", "make the model smaller"),
        # 739 GB over 10**6 layers (before: built them until memory ran out, after pre-tokenizing)
        (dict(num_hidden_layers=10**6), {}, "-parameter model", "num_hidden_layers"),
        # the end-of-run samples: a KV cache of 10**9 + prompt positions x 2 layers x 3 rows
        (dict(max_position_embeddings=10**12), {"sample_max_new_tokens": 10**9},
         "KV cache of 1,000,000,00", "lower sample_max_new_tokens"),
    ],
    ids=["hidden_size", "layers", "samples"],
)  # fmt: skip
def test_training_that_cannot_fit_is_one_line_at_once(tmp_path, corpus, capsys, model, keys,
                                                      needle, fix):  # fmt: skip
    rc, err, seconds = run_train(tmp_path, corpus, capsys, model, **keys)
    assert rc == 2 and "\n" not in err, err
    assert err.startswith("error: training this ") and needle in err and fix in err, err
    assert "needs about" in err and " on cpu but " in err and " is available; " in err, err
    assert seconds < 30, seconds  # the tokenizer loads; no data, no model
    assert not (tmp_path / "cache" / "pretok").exists()  # nothing was pre-tokenized
    assert not any((tmp_path / "ckpt").iterdir())


# ----- from_pretrained: config.json checked against the shard headers first ----------------------


class NeverBuilt(OctoForCausalLM):
    """A model class whose construction fails the test: the checks must refuse first."""

    def __init__(self, config):
        raise AssertionError(f"the model was built (hidden {config.hidden_size}) before the checks")


@pytest.fixture
def saved(tmp_path):
    folder = tmp_path / "m"
    OctoForCausalLM(TINY).save_pretrained(folder, max_shard_size="40KB")
    return folder


def edit_config(folder, **changes):
    d = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**d, **changes}))


def test_config_declaring_a_larger_model_than_its_shards(saved):
    """hidden_size 32768 in config.json over a hidden-64 checkpoint (~26 GB declared)."""
    edit_config(saved, hidden_size=32768, head_dim=8192)
    with pytest.raises(ValueError) as e:
        from_pretrained(NeverBuilt, saved)
    msg = str(e.value)
    assert "has shape (256, 64), the model from config.json expects (256, 32768)" in msg, msg


def test_config_declaring_a_million_layers(saved):
    edit_config(saved, num_hidden_layers=10**6)
    t0 = time.perf_counter()
    with pytest.raises(ValueError) as e:
        from_pretrained(NeverBuilt, saved)
    assert time.perf_counter() - t0 < 5
    msg = str(e.value)
    assert f"{9 * (10**6 - 2)} tensor(s) missing, e.g. ['model.layers.2." in msg, msg


def test_a_model_larger_than_the_free_memory_is_refused_before_it_is_built(saved, monkeypatch):
    """The shards match config.json, but the device has less free memory than the weights need
    (a machine with 1 KB free stands in for a model larger than this one's memory)."""
    monkeypatch.setattr(octo.memory, "available_bytes", lambda device: 1000)
    with pytest.raises(TooLargeError) as e:
        from_pretrained(NeverBuilt, saved)
    need = format_bytes(TINY.num_parameters() * 4)
    msg = str(e.value)
    assert f"the model in {saved} (torch.float32) needs about {need} on cpu but 1 KB" in msg, msg
    monkeypatch.undo()
    assert from_pretrained(OctoForCausalLM, saved).config == TINY


# ----- generation ---------------------------------------------------------------------------------


def test_generation_refuses_a_kv_cache_that_cannot_fit():
    """max_new_tokens 10**9 on a model whose context allows it: the cache (2 layers x 2 KV heads
    x 16 dims x fp32 x 2, per position and row) would be ~512 GB; refused before allocating."""
    model = OctoForCausalLM(OctoConfig.preset("tiny", max_position_embeddings=10**12))
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(TooLargeError) as e:
        model.generate(ids, max_new_tokens=10**9, temperature=0)
    msg = str(e.value)
    assert msg.startswith(
        "generating 1 sequence(s) of up to 1,000,000,003 positions (the KV cache) needs about "
        "512 GB on cpu but "
    ), msg
    assert "lower max_new_tokens" in msg, msg
    assert model.generate(ids, max_new_tokens=2, temperature=0).shape == (1, 5)
