"""What other tools read from the folders a run saves (final/ and checkpoints): the tokenizer's
special token ids in config.json and generation_config.json (so transformers' generate() stops
at end-of-text), a tokenizer_config.json that transformers 4.x loads too (no
"TokenizersBackend" class) with the model's context as model_max_length, and a train_config.json
that names the folder's own tokenizer copy, so a copied checkpoint resumes and generates after
the original tokenizer folder is gone."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from octo import OctoConfig, OctoForCausalLM
from octo.generate import main as generate_main
from train.__main__ import main as train_main
from train.config import TrainConfig


def test_transformers_generate_stops_at_the_saved_eos(tmp_path):
    """A random tiny model whose greedy continuation is known: with its third new token saved as
    eos_token_id, transformers' generate (which reads generation_config.json) stops there."""
    from transformers import LlamaForCausalLM

    model = OctoForCausalLM(OctoConfig.preset("tiny"))
    prompt = torch.tensor([[5, 6, 7]])
    greedy = model.generate(prompt, max_new_tokens=12, temperature=0)[0, 3:].tolist()
    k = next(i for i in range(2, 12) if greedy[i] not in greedy[:i])  # first new token, once more
    eos = greedy[k]
    model.save_pretrained(tmp_path, token_ids={"bos_token_id": 1, "eos_token_id": eos})
    assert json.loads((tmp_path / "generation_config.json").read_text()) == {
        "bos_token_id": 1, "eos_token_id": eos,
    }  # fmt: skip
    hf = json.loads((tmp_path / "config.json").read_text())
    assert (hf["bos_token_id"], hf["eos_token_id"]) == (1, eos)
    llama = LlamaForCausalLM.from_pretrained(tmp_path)
    out = llama.generate(prompt, max_new_tokens=12, do_sample=False)
    assert out[0, 3:].tolist() == greedy[: k + 1]  # stopped at EOS, not after 12 tokens
    model.save_pretrained(tmp_path)  # saved again without a tokenizer: no stale token ids
    assert not (tmp_path / "generation_config.json").exists()


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """A 4-step run with a local tokenizer folder (a copy of the stories tokenizer), checkpoints
    at steps 2 and 4 and final/: (run folder, tokenizer folder)."""
    run = tmp_path_factory.mktemp("interop_run")
    tok = run / "my_tokenizer"
    shutil.copytree(corpus["tokenizer"], tok)
    train_here(
        "--model-config", "tiny", "--set", f"dataset_name={corpus['data']}",
        f"tokenizer_name={tok}", f"data_cache_dir={corpus['cache']}",
        f"checkpoint_dir={run / 'ckpt'}", f"log_dir={run / 'logs'}", "device=cpu",
        "precision=fp32", "compile=off", "kernels=torch", "block_size=32", "batch_size=2",
        "gradient_accumulation_steps=1", "max_steps=4", "save_interval_steps=2",
        "eval_max_batches=1", "sample_max_new_tokens=4", "pretokenize=true", "num_workers=0",
    )  # fmt: skip
    return run, tok


def train_here(*argv: str) -> None:
    """`python -m train` inside this process (the environment restored after: a run sets
    OCTO_KERNELS)."""
    saved = dict(os.environ)
    try:
        assert train_main(list(argv)) == 0
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.mark.parametrize("folder", ["final", "checkpoint_step_4"])
def test_saved_folders_name_the_tokenizer_for_other_tools(trained, folder):
    from transformers import AutoTokenizer, GenerationConfig

    run, tok_dir = trained
    path = run / "ckpt" / folder
    tok = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=False)
    assert (tok.eos_token_id, tok.bos_token_id) == (0, 1)  # the stories tokenizer's
    hf = json.loads((path / "config.json").read_text())
    assert (hf["bos_token_id"], hf["eos_token_id"]) == (1, 0)
    assert GenerationConfig.from_pretrained(path).eos_token_id == 0
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"  # 4.x has no TokenizersBackend
    assert tok_cfg["model_max_length"] == OctoConfig.preset("tiny").max_position_embeddings
    assert not {"backend", "is_local", "local_files_only", "auto_map"} & set(tok_cfg)
    text = (path / "train_config.json").read_text()
    assert json.loads(text)["tokenizer_name"] == "." and str(tok_dir) not in text
    assert not [p for p in path.iterdir() if p.suffix == ".py"]


def test_a_copied_checkpoint_resumes_and_generates_without_the_tokenizer_folder(
    trained, tmp_path, capsys
):
    run, tok_dir = trained
    copy = tmp_path / "moved"
    shutil.copytree(run / "ckpt", copy)
    shutil.rmtree(tok_dir)
    try:
        ckpt = copy / "checkpoint_step_2"
        assert TrainConfig.load(ckpt / "train_config.json").tokenizer_name == str(ckpt)
        train_here("--config", str(ckpt / "train_config.json"), "--set", f"resume_from={ckpt}",
                   f"checkpoint_dir={tmp_path / 'ckpt2'}", f"log_dir={tmp_path / 'logs'}",
                   "max_steps=3")  # fmt: skip
        assert (tmp_path / "ckpt2" / "final").is_dir()
        capsys.readouterr()
        assert generate_main(["--checkpoint", str(copy / "final"), "--prompt", "Once",
                              "--max-new-tokens", "4"]) == 0  # fmt: skip
        assert capsys.readouterr().out.startswith("Once")
    finally:
        shutil.copytree(copy / "final", tok_dir)  # for tests after this one in the module


def test_model_card_names_the_optimizer_the_run_used():
    """The card's optimizer row: AdamW's peak lr for optimizer adamw; for muon, Muon (its peak lr
    and momentum) for the decoder layers' matrices and AdamW (its scaled lr) for the rest. It
    said "AdamW, peak learning rate ..." for a muon run too."""
    from tests.fakes import final_run
    from train.model_card import facts

    model = OctoForCausalLM(OctoConfig.preset("tiny"))
    adamw = dict(facts(final_run(TrainConfig(), model)))["optimizer"]
    assert adamw == ("AdamW, peak learning rate 0.0003, cosine schedule, 100 warmup steps, weight "
                     "decay 0.01")  # fmt: skip
    cfg = TrainConfig(optimizer="muon", learning_rate=1e-3, muon_learning_rate=0.02,
                      muon_adamw_lr_scale=3.0, muon_momentum=0.9)  # fmt: skip
    muon = dict(facts(final_run(cfg, model)))["optimizer"]
    assert muon == (
        "Muon for the decoder layers' matrices (peak learning rate 0.02, momentum 0.9, weight "
        "decay 0), AdamW for the other parameters (peak learning rate 0.003, weight decay 0.01); "
        "cosine schedule, 100 warmup steps"
    )
