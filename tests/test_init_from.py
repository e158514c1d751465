"""init_from: a fresh run that starts from trained weights. A demo-style tiny model trained on
generated stories, then fine-tuned with init_from on other stories: the fine-tune's first logged
loss is where the trained model is, far below ln(V), the loss of untrained weights. Also: the
configs it saves resume it without init_from, a tokenizer too large for the weights is one line,
and a checkpoint or a transformers Llama folder gives its weights, an incomplete save none."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from tests.fakes import randomize_
from tests.test_hf_interop import hf_config
from train.__main__ import main
from train.checkpoint import CheckpointError
from train.checkpoint.resume import load_init_model
from train.config import TrainConfig

STEPS = 100  # the train loss falls from ln(V) = 6.24 nats to 3.08 (measured on CPU)


def train(corpus: dict, tmp: Path, name: str, data: Path, *extra: str) -> tuple[int, list[dict]]:
    """main() on CPU with `extra` config keys; returns the exit code and the run's records. The
    data streams in this process (num_workers 0): no worker processes to fork."""
    code = main([
        "--set", f"dataset_name={data}", f"tokenizer_name={corpus['tokenizer']}",
        f"data_cache_dir={tmp / 'cache'}", f"checkpoint_dir={tmp / name}",
        f"log_dir={tmp / (name + '_logs')}", "block_size=64", "batch_size=8",
        "gradient_accumulation_steps=1", "learning_rate=3e-3", "num_epochs=5",
        "eval_interval_steps=1000", "save_interval_steps=1000", "eval_max_batches=2",
        "device=cpu", "num_workers=0", "sample_max_new_tokens=2", "pretokenize=false", *extra,
    ])  # fmt: skip
    logs = sorted((tmp / (name + "_logs")).glob("training_*.jsonl"))
    records = [json.loads(line) for f in logs for line in f.read_text().splitlines()]
    return code, records


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> tuple[Path, float]:
    """The trained run's folder (checkpoints in tmp/a) and its last logged train loss."""
    tmp = tmp_path_factory.mktemp("init_from")
    code, records = train(corpus, tmp, "a", corpus["data"], "model_config=tiny",
                          f"max_steps={STEPS}", "warmup_steps=10",
                          "log_interval_steps=10")  # fmt: skip
    assert code == 0
    losses = [r["loss"] for r in records if r["type"] == "train"]
    assert losses[-1] < losses[0] - 1.5, losses  # it learned
    return tmp, losses[-1]


def other_stories(root: Path) -> Path:
    """Stories the trained model never saw (other seeds of the same generator)."""
    from train.data.demo import generate_stories

    data = root / "other"
    data.mkdir(exist_ok=True)
    for split, n, seed in (("train", 200, 11), ("validation", 30, 12)):
        with open(data / f"{split}.jsonl", "w") as f:
            for text in generate_stories(n, seed):
                f.write(json.dumps({"text": text}) + "\n")
    return data


def test_fine_tune_starts_where_the_trained_model_is(corpus, trained, capsys):
    tmp, trained_loss = trained
    final = tmp / "a" / "final"
    code, records = train(corpus, tmp, "b", other_stories(tmp), f"init_from={final}",
                          "max_steps=2", "warmup_steps=10", "log_interval_steps=1")  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert f"Initialized from {final}: its weights, with a new optimizer" in out
    start = next(r for r in records if r["type"] == "start")
    first = next(r for r in records if r["type"] == "train")
    assert start["step"] == 0 and start["total_steps"] == 2  # a fresh step count and schedule
    assert first["step"] == 1
    vocab = start["model_config"]["vocab_size"]
    assert vocab == 512
    # Untrained weights score about ln(V) = 6.24 nats; the fine-tune's first step scores what the
    # trained model scored on its own stories, within half a nat.
    assert first["loss"] < math.log(vocab) - 2.5, (first["loss"], trained_loss)
    assert abs(first["loss"] - trained_loss) < 0.5, (first["loss"], trained_loss)
    # Its saved config resumes it as it is: the model by its fields, init_from done (null).
    saved = json.loads((tmp / "b" / "checkpoint_step_2" / "train_config.json").read_text())
    assert saved["init_from"] is None and saved["model_config"]["vocab_size"] == 512
    assert saved["model_config"]["hidden_size"] == 64
    TrainConfig.load(tmp / "b" / "checkpoint_step_2" / "train_config.json",
                     [f"resume_from={tmp / 'b'}"])  # fmt: skip


def test_a_tokenizer_larger_than_the_weights_is_one_line(trained, gpt2_tokenizer_dir, capsys):
    tmp, _ = trained
    final = tmp / "a" / "final"
    code = main([
        "--set", f"init_from={final}", "dataset_name=no/such/data.txt",
        f"tokenizer_name={gpt2_tokenizer_dir}", f"data_cache_dir={tmp / 'cache_c'}",
        f"checkpoint_dir={tmp / 'c'}", f"log_dir={tmp / 'c_logs'}", "block_size=64",
        "device=cpu", "max_steps=1",
    ])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: tokenizer {str(gpt2_tokenizer_dir)!r} has 50257 tokens but init_from {final}'s "
        "model has vocab_size 512; set tokenizer_name to the tokenizer the model was trained "
        "with (a final or checkpoint folder holds it: tokenizer_name=<that folder>)\n"
    )


def test_checkpoint_and_transformers_folders_give_their_weights(trained, tmp_path):
    from transformers import LlamaForCausalLM

    from octo import OctoConfig

    tmp, _ = trained
    final = load_init_model(tmp / "a" / "final").state_dict()
    ckpt = tmp / "a" / f"checkpoint_step_{STEPS}"
    from_ckpt = load_init_model(ckpt).state_dict()
    assert from_ckpt.keys() == final.keys()
    assert all(torch.equal(from_ckpt[k], final[k]) for k in final)
    partial = tmp_path / f"checkpoint_step_{STEPS}.tmp"  # an interrupted save: no marker
    shutil.copytree(ckpt, partial)
    (partial / "checkpoint_complete.json").unlink()
    with pytest.raises(CheckpointError, match=r"^init_from: .* has no checkpoint_complete.json"):
        load_init_model(partial)

    hf = randomize_(LlamaForCausalLM(hf_config(OctoConfig.preset("tiny")))).eval()
    hf.save_pretrained(tmp_path / "llama")
    ours = load_init_model(tmp_path / "llama").state_dict()
    theirs = hf.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    (tmp_path / "llama" / "model.safetensors").write_bytes(b"broken")
    with pytest.raises(CheckpointError, match=r"^init_from .*llama: shard .* is truncated"):
        load_init_model(tmp_path / "llama")
