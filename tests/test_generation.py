"""Generation: KV-cache decoding, greedy parity with transformers, sampling filters, the CLI."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
from test_hf_interop import hf_twin, max_diff, octo_model

from octo import OctoConfig, OctoForCausalLM
from octo.generate import main
from octo.model import KVCache
from octo.sampling import sample_next

GPT2_VOCAB = 50304  # 50257 rounded up to a multiple of 64


@pytest.mark.parametrize(
    "case",
    [
        dict(num_key_value_heads=1, tie_word_embeddings=True),
        dict(num_key_value_heads=2, attention_bias=True),
        dict(num_key_value_heads=4, rope_theta=500000.0),
    ],
    ids=["kv1-tied", "kv2-bias", "kv4-theta5e5"],
)
def test_greedy_generation_matches_transformers(case):
    model = octo_model(**case).eval()
    hf = hf_twin(model)
    prompt = torch.randint(0, 256, (2, 7))
    ours = model.generate(prompt, max_new_tokens=32, temperature=0.0)
    theirs = hf.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        do_sample=False,
        max_new_tokens=32,
        min_new_tokens=32,
        eos_token_id=None,
        pad_token_id=0,
    )
    assert ours.shape == (2, 7 + 32)
    assert torch.equal(ours, theirs)


def test_kv_cache_decoding_equals_full_recomputation():
    """Prefill logits, and the logits of each of 12 one-token steps, equal a full forward pass
    over the whole sequence so far (1e-5: the cached path attends through an explicit mask)."""
    model = octo_model(num_key_value_heads=2, attention_bias=True).eval()
    ids = torch.randint(0, 256, (3, 9))
    cache = KVCache(model.config, batch=3, max_len=9 + 12, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        cached = model.lm_head(model.hidden_states(ids, cache=cache))  # (B, 9, V)
        assert max_diff(cached, model(ids).logits) <= 1e-5
        for _ in range(12):
            nxt = cached[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            ids = torch.cat([ids, nxt], dim=1)
            cached = model.lm_head(model.hidden_states(nxt, cache=cache))  # (B, 1, V)
            full = model(ids).logits[:, -1:]  # (B, 1, V)
            assert max_diff(cached, full) <= 1e-5
    assert cache.length == 21
    with pytest.raises(ValueError, match="KV cache holds 21 positions"):
        model.hidden_states(nxt, cache=cache)


def test_eos_stops_rows_and_generation():
    model = octo_model(num_key_value_heads=2).eval()
    prompt = torch.randint(0, 256, (2, 5))
    free = model.generate(prompt, max_new_tokens=20, temperature=0.0)[:, 5:]  # (2, 20)
    eos = int(free[0, 3])
    out = model.generate(prompt, max_new_tokens=20, temperature=0.0, eos_token_id=eos)[:, 5:]
    first = [int((row == eos).nonzero()[0]) if (row == eos).any() else len(row) - 1 for row in free]
    assert out.shape[1] == max(first) + 1  # stops once every row has emitted eos
    for b, f in enumerate(first):
        assert torch.equal(out[b, : f + 1], free[b, : f + 1])
        assert (out[b, f + 1 :] == eos).all()  # a finished row keeps emitting eos


def test_transformers_generate_arguments_mean_the_same_on_octo():
    """A call written for LlamaForCausalLM.generate (do_sample, max_new_tokens, eos_token_id as
    an id or a list, pad_token_id, attention_mask as a tokenizer returns it) runs on Octo and
    gives transformers' tokens: greedy, rows stopped at eos, then padded with pad_token_id."""
    model = octo_model(num_key_value_heads=2).eval()
    hf = hf_twin(model)
    prompt = torch.randint(0, 256, (2, 7))
    free = model.generate(prompt, max_new_tokens=12, temperature=0.0)[:, 7:]  # (2, 12)
    for eos in (int(free[0, 3]), [int(free[0, 3]), int(free[1, 5])]):
        call = dict(attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=12,
                    eos_token_id=eos, pad_token_id=0)  # fmt: skip
        ours = model.generate(prompt, temperature=0.7, top_k=5, **call)  # sampling args unused
        theirs = hf.generate(prompt, temperature=0.7, top_k=5, **call)
        assert torch.equal(ours, theirs), (ours, theirs)
        assert (ours[0, 7 + 4 :] == 0).all()  # row 0 ended at its eos, then pad_token_id
    inputs = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}  # tokenizer(...)
    assert torch.equal(model.generate(**inputs, do_sample=False, max_new_tokens=12)[:, 7:], free)

    def sample(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return model.generate(prompt, do_sample=True, max_new_tokens=8, top_p=0.9, generator=g)

    assert torch.equal(sample(1), sample(1)) and not torch.equal(sample(1), sample(2))
    with pytest.raises(ValueError, match="do_sample=True needs temperature > 0, got 0"):
        model.generate(prompt, do_sample=True, temperature=0)
    padded = torch.ones_like(prompt)
    padded[1, :2] = 0
    with pytest.raises(ValueError, match="padded prompts"):
        model.generate(prompt, attention_mask=padded, do_sample=False)


def test_generation_stops_at_max_position_embeddings():
    model = OctoForCausalLM(OctoConfig.preset("tiny", max_position_embeddings=12)).eval()
    out = model.generate(torch.zeros(1, 5, dtype=torch.long), max_new_tokens=50, temperature=0)
    assert out.shape == (1, 12)


def test_generation_under_bf16_autocast_matches_its_own_recomputation():
    model = octo_model().eval()
    prompt = torch.randint(0, 256, (1, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.generate(prompt, max_new_tokens=6, temperature=0.0)
    assert out.shape == (1, 12) and model.training is False
    # the last token is the argmax of a bf16 full forward over the sequence before it
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        logits = model(out[:, :-1]).logits[0, -1].float()
    assert logits[out[0, -1]] >= logits.max() - 0.1  # bf16 cache vs recompute: near-ties only


def test_sampling_is_seeded_and_filters_reduce_to_greedy():
    model = octo_model().eval()
    prompt = torch.randint(0, 256, (2, 4))

    def sample(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return model.generate(prompt, max_new_tokens=16, generator=g, **kw)

    assert torch.equal(sample(1, temperature=1.0), sample(1, temperature=1.0))
    assert not torch.equal(sample(1, temperature=1.0), sample(2, temperature=1.0))
    greedy = model.generate(prompt, max_new_tokens=16, temperature=0.0)
    assert torch.equal(sample(3, temperature=1.0, top_k=1), greedy)
    assert torch.equal(sample(3, temperature=1.0, top_p=1e-6), greedy)


def test_sample_next_filters():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(20000, 1)  # (N, 4)
    g = torch.Generator().manual_seed(0)
    counts = lambda t: torch.bincount(t, minlength=4).double() / len(t)  # noqa: E731
    free = counts(sample_next(logits, 1.0, generator=g))
    assert max_diff(free, probs) < 0.02  # sampling is from the distribution itself
    top2 = counts(sample_next(logits, 1.0, top_k=2, generator=g))
    assert top2[2:].sum() == 0 and abs(top2[0] - 0.5 / 0.8) < 0.02
    # top_p 0.7: token 1 is needed to reach 0.7 (0.5 < 0.7), token 2 is not (0.8 >= 0.7)
    nucleus = counts(sample_next(logits, 1.0, top_p=0.7, generator=g))
    assert nucleus[2:].sum() == 0 and abs(nucleus[0] - 0.5 / 0.8) < 0.02
    # temperature 0.5 squares the probabilities (renormalised)
    cold = counts(sample_next(logits, 0.5, generator=g))
    assert max_diff(cold, probs.square() / probs.square().sum()) < 0.02
    assert torch.equal(sample_next(logits[:3], 0.0), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
    ],
)
def test_sample_next_rejects_bad_arguments(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        sample_next(torch.zeros(1, 4), **{"temperature": 1.0, **kwargs})


# ----- python -m octo.generate -----------------------------------------------------------------


@pytest.fixture
def gpt2_checkpoint(tmp_path, gpt2_tokenizer_dir):
    """A saved tiny model whose vocabulary fits GPT-2's tokenizer, with the tokenizer beside it:
    (checkpoint folder, the model)."""
    cfg = OctoConfig.preset("tiny", vocab_size=GPT2_VOCAB, tie_word_embeddings=True)
    model = OctoForCausalLM(cfg).eval()
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    shutil.copytree(gpt2_tokenizer_dir, folder, dirs_exist_ok=True)
    return folder, model


def expected_greedy_text(model, tokenizer_dir, prompt: str, n: int) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=n, temperature=0.0, eos_token_id=tok.eos_token_id)
    return tok.decode(out[0].tolist(), skip_special_tokens=True)


def test_cli_prints_greedy_continuation(gpt2_checkpoint):
    folder, model = gpt2_checkpoint
    args = ["--checkpoint", str(folder), "--prompt", "Once upon a time"]
    result = subprocess.run(
        [sys.executable, "-m", "octo.generate", *args, "--max-new-tokens", "12"]
        + ["--temperature", "0", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    text = result.stdout.rstrip("\n")
    assert text.startswith("Once upon a time") and len(text) > len("Once upon a time")
    assert text == expected_greedy_text(model, folder, "Once upon a time", 12)


def test_cli_sampling_is_seeded(gpt2_checkpoint, capsys):
    folder, _ = gpt2_checkpoint
    args = ["--checkpoint", str(folder), "--prompt", "Hello", "--max-new-tokens", "8"]
    outputs = []
    for seed in ("5", "5", "6"):
        assert main([*args, "--seed", seed, "--top-k", "20", "--top-p", "0.9"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] != outputs[2]
    assert all(o.startswith("Hello") for o in outputs)


def test_cli_tokenizer_flag_and_missing_tokenizer(tmp_path, gpt2_tokenizer_dir, capsys):
    cfg = OctoConfig.preset("tiny", vocab_size=GPT2_VOCAB, tie_word_embeddings=True)
    model = OctoForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "bare")  # no tokenizer files
    args = ["--checkpoint", str(tmp_path / "bare"), "--prompt", "Hi", "--temperature", "0"]
    assert main([*args, "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no tokenizer in") and "--tokenizer" in err and "\n" not in err
    assert main([*args, "--max-new-tokens", "4", "--tokenizer", str(gpt2_tokenizer_dir)]) == 0
    out = capsys.readouterr().out.rstrip("\n")
    assert out == expected_greedy_text(model, gpt2_tokenizer_dir, "Hi", 4)


def test_cli_refuses_a_tokenizer_larger_than_the_model(tmp_path, gpt2_tokenizer_dir, capsys):
    octo_model().save_pretrained(tmp_path / "small")  # vocab 256 < GPT-2's 50257
    code = main(
        ["--checkpoint", str(tmp_path / "small"), "--prompt", "Hi"]
        + ["--tokenizer", str(gpt2_tokenizer_dir)]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "50257 tokens" in err and "vocab_size is 256" in err
    assert main(["--checkpoint", str(tmp_path / "nowhere"), "--prompt", "Hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint folder") and "does not exist" in err


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--device", "tpu"], "--device 'tpu' is not a device here; use cpu, cuda or cuda:N"),
        (["--device", "cuda:1"], "CUDA"),  # not available, or not that many devices
        (["--temperature", "nan"], "temperature must be a finite number >= 0"),
        (["--temperature", "inf"], "temperature must be a finite number >= 0"),
        (["--top-p", "nan"], "top_p must be in (0, 1]"),
        (["--top-k", "-2"], "top_k must be >= 0"),
    ],
)
def test_cli_checks_arguments_before_loading(extra, needle, tmp_path, capsys):
    """Each is one line and exit 2 before the (here missing) checkpoint is looked at; torch's
    own errors were a RuntimeError/AssertionError traceback or a NaN deep in multinomial."""
    if extra[1] == "cuda:1" and torch.cuda.device_count() > 1:
        pytest.skip("this machine has a cuda:1")
    assert main(["--checkpoint", str(tmp_path / "nowhere"), "--prompt", "Hi", *extra]) == 2
    assert needle in one_error_line(capsys)


def test_cli_refuses_a_file_and_non_finite_weights(tmp_path, capsys):
    model = octo_model()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    args = ["--prompt", "Hi", "--device", "cpu"]
    assert main(["--checkpoint", str(tmp_path / "nan" / "config.json"), *args]) == 2
    err = one_error_line(capsys)
    assert (
        "config.json is a file; pass the checkpoint folder" in err and str(tmp_path / "nan") in err
    )
    assert main(["--checkpoint", str(tmp_path / "nan"), *args]) == 2
    err = one_error_line(capsys)
    assert "weights are not finite (model.layers.0.mlp.up_proj.weight" in err
    assert "use an earlier checkpoint" in err


def test_cli_names_a_broken_config_or_tokenizer_file(tmp_path, capsys):
    """AutoTokenizer's errors name no file (JSONDecodeError) or are a KeyError/OSError traceback;
    each is now one line naming the folder or file."""
    folder = tmp_path / "ckpt"
    octo_model().save_pretrained(folder)
    args = ["--checkpoint", str(folder), "--prompt", "Hi", "--device", "cpu"]
    (folder / "tokenizer.json").write_text("{\n bad")
    assert main(args) == 2
    err = one_error_line(capsys)
    assert f"{folder / 'tokenizer.json'} does not read as JSON" in err and "--tokenizer" in err
    (folder / "tokenizer.json").write_text('{"a": 1}')  # JSON, but no tokenizer
    (folder / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    assert main(args) == 2
    assert f"the tokenizer in {folder} does not load" in one_error_line(capsys)
    assert main([*args, "--tokenizer", str(tmp_path / "nowhere")]) == 2
    assert "no tokenizer in" in one_error_line(capsys)
    (folder / "config.json").write_text("{bad")
    assert main(args) == 2
    assert f"{folder / 'config.json'} is not valid JSON" in one_error_line(capsys)


@pytest.mark.parametrize("tokenizer", ["gpt2", "trained"])
@pytest.mark.parametrize("marked", [False, True], ids=["plain", "with_marker"])
def test_cli_names_a_missing_tokenizer_json(tmp_path, gpt2_tokenizer_dir, corpus, capsys,
                                            tokenizer, marked):  # fmt: skip
    """tokenizer.json deleted, tokenizer_config.json left: one line naming the missing file.
    transformers asked for sentencepiece or tiktoken (a tokenizer Octo trained) or built a
    one-token GPT-2 tokenizer and generated from it (exit 0). In a folder with a completion
    marker the marker names it (the save listed it)."""
    from octo.integrity import seal

    cfg = OctoConfig.preset("tiny", vocab_size=GPT2_VOCAB, tie_word_embeddings=True)
    folder = tmp_path / "ckpt"
    OctoForCausalLM(cfg).save_pretrained(folder)
    source = gpt2_tokenizer_dir if tokenizer == "gpt2" else corpus["tokenizer"]
    shutil.copytree(source, folder, dirs_exist_ok=True)
    if marked:
        seal(folder, kind="model")
    args = ["--checkpoint", str(folder), "--prompt", "Hi", "--device", "cpu"]
    assert main([*args, "--max-new-tokens", "1"]) == 0
    capsys.readouterr()
    (folder / "tokenizer.json").unlink()
    assert main(args) == 2
    err = one_error_line(capsys)
    if marked:
        assert err.startswith(f"error: {folder / 'tokenizer.json'} is missing (the save listed it")
    else:
        assert err.startswith(f"error: {folder / 'tokenizer.json'} is missing: {folder} has a")
    assert "--tokenizer DIR" in err


def test_cli_names_a_broken_marker(tmp_path, capsys):
    """A completion marker that does not parse is named (a damaged folder must not load as one
    without a marker, unchecked)."""
    folder = tmp_path / "ckpt"
    octo_model().save_pretrained(folder)
    (folder / "checkpoint_complete.json").write_text("{")
    assert main(["--checkpoint", str(folder), "--prompt", "Hi", "--device", "cpu"]) == 2
    assert f"{folder / 'checkpoint_complete.json'} is not valid JSON" in one_error_line(capsys)
