"""python -m octo.export_gguf: the GGUF file read back with gguf's own reader (metadata, every
tensor against the safetensors weight with the Q/K permutation undone, the tokenizer), the
permutation against llama.cpp's interleaved rotary embedding, the refusals, and (slow, when
llama-cpp-python is installed) llama.cpp running the file to Octo's logits and greedy tokens."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from octo import OctoConfig, OctoForCausalLM
from octo.model import rope_cos_sin
from octo_kernels.rope import apply_rope_ref
from tests.child_env import child_env
from tests.fakes import randomize_

gguf = pytest.importorskip("gguf", reason="GGUF export needs the gguf package (pip install gguf)")

from octo.export_gguf import export_gguf, from_gguf_qk, main, to_gguf_qk  # noqa: E402

GPT2_VOCAB = 50304  # 50257 rounded up to a multiple of 64: 47 padding ids


def model_folder(path: Path, tokenizer_dir: Path, **overrides) -> Path:
    cfg = OctoConfig.preset("tiny", **overrides)
    randomize_(OctoForCausalLM(cfg), seed=7).save_pretrained(path)
    shutil.copytree(tokenizer_dir, path, dirs_exist_ok=True)
    return path


def safetensors_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def field(reader, key: str):
    return reader.fields[key].contents()


def gguf_tensor(t) -> torch.Tensor:
    """A GGUFReader tensor as a torch tensor in PyTorch's (rows, cols) order."""
    if t.tensor_type == gguf.GGMLQuantizationType.BF16:  # raw bytes, 2 per value
        raw = torch.from_numpy(t.data.copy()).view(torch.int16).view(torch.bfloat16)
        return raw.reshape([int(n) for n in reversed(t.shape)])
    return torch.from_numpy(t.data.copy()).reshape([int(n) for n in reversed(t.shape)])


HF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def hf_name(name: str) -> str:
    """llama.cpp's tensor name -> transformers' (written out here, not taken from gguf's map)."""
    if name.startswith("blk."):
        _, n, rest = name.split(".", 2)
        return f"model.layers.{n}.{HF_NAMES[rest]}"
    return HF_NAMES[name]


# ----- the permutation -----------------------------------------------------------------------


def interleaved_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """llama.cpp's rotation for the llama architecture: adjacent pairs (2i, 2i + 1) of each head
    turned by angle pos * theta^(-2i/D). x: (H, T, D)."""
    H, T, D = x.shape
    inv = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)  # (D/2,)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]  # (T, D/2)
    c, s = ang.cos(), ang.sin()
    even, odd = x[..., 0::2], x[..., 1::2]  # (H, T, D/2)
    out = torch.empty_like(x)
    out[..., 0::2] = even * c - odd * s
    out[..., 1::2] = even * s + odd * c
    return out


@pytest.mark.parametrize("n_head,n_kv", [(4, 4), (4, 2), (4, 1)])
def test_permuted_qk_under_llama_cpp_rope_give_octos_attention_scores(n_head, n_kv):
    D, C, T, theta = 16, 32, 9, 10000.0
    g = torch.Generator().manual_seed(0)
    wq = torch.randn(n_head * D, C, generator=g, dtype=torch.float64)
    wk = torch.randn(n_kv * D, C, generator=g, dtype=torch.float64)
    x = torch.randn(T, C, generator=g, dtype=torch.float64)
    heads = lambda w, h: (x @ w.T).view(T, h, D).transpose(0, 1)  # (H, T, D)

    cos, sin = rope_cos_sin(torch.arange(T), D, theta)
    q, k = apply_rope_ref(heads(wq, n_head)[None], heads(wk, n_kv)[None], cos, sin)
    octo_scores = q[0] @ k[0].repeat_interleave(n_head // n_kv, 0).transpose(1, 2)  # (H, T, T)

    q2 = interleaved_rope(heads(to_gguf_qk(wq, n_head), n_head), theta)
    k2 = interleaved_rope(heads(to_gguf_qk(wk, n_kv), n_kv), theta)
    cpp_scores = q2 @ k2.repeat_interleave(n_head // n_kv, 0).transpose(1, 2)
    torch.testing.assert_close(cpp_scores, octo_scores, rtol=1e-5, atol=1e-5)
    # without the permutation llama.cpp's rotation would pair the wrong rows
    q3 = interleaved_rope(heads(wq, n_head), theta)
    assert not torch.allclose(q3 @ q3.transpose(1, 2), q[0] @ q[0].transpose(1, 2), atol=1e-3)
    assert torch.equal(from_gguf_qk(to_gguf_qk(wq, n_head), n_head), wq)
    bias = torch.randn(n_kv * D, generator=g)
    assert torch.equal(from_gguf_qk(to_gguf_qk(bias, n_kv), n_kv), bias)


# ----- the file read back --------------------------------------------------------------------


def check_file(r, folder: Path, dtype: str) -> None:
    """The GGUF file's metadata is the model's, and each tensor is its safetensors weight (in
    `dtype`, norms and biases f32) once the Q/K permutation is undone."""
    cfg = OctoConfig.from_json_file(folder / "config.json")
    assert field(r, "general.architecture") == "llama"
    assert field(r, "llama.context_length") == cfg.max_position_embeddings
    assert field(r, "llama.embedding_length") == cfg.hidden_size
    assert field(r, "llama.block_count") == cfg.num_hidden_layers
    assert field(r, "llama.feed_forward_length") == cfg.intermediate_size
    assert field(r, "llama.attention.head_count") == cfg.num_attention_heads
    assert field(r, "llama.attention.head_count_kv") == cfg.num_key_value_heads
    assert field(r, "llama.rope.freq_base") == cfg.rope_theta
    assert field(r, "llama.rope.dimension_count") == cfg.head_dim
    assert field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.rms_norm_eps)
    assert field(r, "llama.vocab_size") == cfg.vocab_size
    file_type = {"f32": 0, "f16": 1, "bf16": 32}[dtype]  # llama.cpp's LLAMA_FTYPE values
    assert field(r, "general.file_type") == file_type

    weights = safetensors_weights(folder)
    got = {}
    for t in r.tensors:
        name = hf_name(t.name)
        w = gguf_tensor(t)
        if "q_proj" in name:
            w = from_gguf_qk(w, cfg.num_attention_heads)
        elif "k_proj" in name:
            w = from_gguf_qk(w, cfg.num_key_value_heads)
        got[name] = w
        src = weights[name]
        if src.dim() == 1 or dtype == "f32":  # norms and biases are always f32
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, t.name
            assert torch.equal(w, src), t.name
        else:
            want = src.to({"f16": torch.float16, "bf16": torch.bfloat16}[dtype])
            assert w.dtype == want.dtype and torch.equal(w, want), t.name
    assert set(got) == set(weights)  # every weight, nothing else


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_tensors_read_back_in_each_dtype(tmp_path, corpus, dtype):
    folder = model_folder(tmp_path / "m", corpus["tokenizer"], vocab_size=576,
                          num_key_value_heads=2, attention_bias=True)  # fmt: skip
    check_file(
        gguf.GGUFReader(export_gguf(folder, tmp_path / "m.gguf", dtype=dtype)), folder, dtype
    )


def test_gpt2_model_reads_back(tmp_path, gpt2_tokenizer_dir):
    folder = model_folder(tmp_path / "m", gpt2_tokenizer_dir, vocab_size=GPT2_VOCAB,
                          num_key_value_heads=1, attention_bias=True)  # fmt: skip
    out = export_gguf(folder, tmp_path / "m.gguf", dtype="f32")
    r = gguf.GGUFReader(out)
    check_file(r, folder, "f32")

    tok = json.loads((folder / "tokenizer.json").read_text())
    tokens = field(r, "tokenizer.ggml.tokens")
    by_id = {i: s for s, i in tok["model"]["vocab"].items()}
    assert tokens[:50257] == [by_id[i] for i in range(50257)]
    assert tokens[50257:] == [f"[PAD{i}]" for i in range(50257, GPT2_VOCAB)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    assert field(r, "tokenizer.ggml.merges") == merges and len(merges) == 50000
    types = field(r, "tokenizer.ggml.token_type")
    assert types[50256] == gguf.TokenType.CONTROL  # <|endoftext|>
    assert set(types[:50256]) == {gguf.TokenType.NORMAL}
    assert set(types[50257:]) == {gguf.TokenType.UNUSED}
    assert field(r, "tokenizer.ggml.model") == "gpt2"
    assert field(r, "tokenizer.ggml.pre") == "gpt-2"
    assert field(r, "tokenizer.ggml.eos_token_id") == 50256
    assert field(r, "tokenizer.ggml.bos_token_id") == 50256
    assert field(r, "tokenizer.ggml.add_bos_token") is False
    assert len(field(r, "tokenizer.ggml.scores")) == GPT2_VOCAB


def test_octo_trained_tokenizer_and_tied_model(tmp_path, corpus):
    """The tokenizer `python -m train.tokenizer` trains (llama.cpp's own converter refuses it) and
    a tied model: no output.weight, llama.cpp reuses token_embd."""
    folder = model_folder(tmp_path / "m", corpus["tokenizer"], vocab_size=576,
                          tie_word_embeddings=True, num_key_value_heads=1)  # fmt: skip
    out = tmp_path / "sub" / "m.gguf"  # a missing parent folder is made
    assert main([str(folder), str(out), "--dtype", "f32"]) == 0
    r = gguf.GGUFReader(out)
    names = {t.name for t in r.tensors}
    assert "output.weight" not in names and "token_embd.weight" in names

    tok = json.loads((corpus["tokenizer"] / "tokenizer.json").read_text())
    vocab = {i: s for s, i in tok["model"]["vocab"].items()}
    vocab.update({a["id"]: a["content"] for a in tok["added_tokens"]})
    n = len(vocab)
    tokens = field(r, "tokenizer.ggml.tokens")
    assert tokens[:n] == [vocab[i] for i in range(n)] and len(tokens) == 576
    assert tokens[:2] == ["<|endoftext|>", "<|startoftext|>"]
    types = field(r, "tokenizer.ggml.token_type")
    assert types[:2] == [gguf.TokenType.CONTROL] * 2
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    assert field(r, "tokenizer.ggml.merges") == merges and merges
    assert field(r, "tokenizer.ggml.pre") == "gpt-2"
    assert field(r, "tokenizer.ggml.eos_token_id") == 0
    assert field(r, "tokenizer.ggml.bos_token_id") == 1
    assert field(r, "tokenizer.ggml.add_bos_token") is False  # training adds none either


# ----- refusals ------------------------------------------------------------------------------


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def rewrite_tokenizer(folder: Path, edit) -> None:
    path = folder / "tokenizer.json"
    spec = json.loads(path.read_text())
    edit(spec)
    path.write_text(json.dumps(spec))


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda s: s.update(pre_tokenizer={"type": "Metaspace", "replacement": "▁",
                                           "prepend_scheme": "always", "split": True}),
         "pre-tokenizer Metaspace"),
        (lambda s: s["pre_tokenizer"].update(add_prefix_space=True),
         "pre-tokenizer ByteLevel(add_prefix_space=true"),
        (lambda s: s.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "\\d"}, "behavior": "Isolated",
             "invert": False}, dict(s["pre_tokenizer"])]}),
         "pre-tokenizer Sequence[Split, ByteLevel]"),
        (lambda s: s.update(normalizer={"type": "NFC"}), "normalizer NFC"),
    ],
)  # fmt: skip
def test_refuses_a_pre_tokenizer_llama_cpp_lacks(tmp_path, corpus, capsys, edit, needle):
    folder = model_folder(tmp_path / "m", corpus["tokenizer"], vocab_size=576)
    rewrite_tokenizer(folder, edit)
    err = one_line_error(capsys, [str(folder), str(tmp_path / "m.gguf")])
    assert needle in err and "byte-level BPE" in err
    assert not (tmp_path / "m.gguf").exists()


def test_bad_arguments_are_one_line(tmp_path, corpus, capsys):
    folder = model_folder(tmp_path / "run" / "final", corpus["tokenizer"], vocab_size=576)
    out = tmp_path / "m.gguf"
    assert "does not exist" in one_line_error(capsys, [str(tmp_path / "nope"), str(out)])
    err = one_line_error(capsys, [str(tmp_path / "run"), str(out)])
    assert "not a model folder" in err and str(folder) in err  # names the folder inside
    err = one_line_error(capsys, [str(folder), str(out), "--dtype", "q4"])
    assert "--dtype 'q4'" in err and "f16, bf16, f32" in err
    assert "is a folder" in one_line_error(capsys, [str(folder), str(tmp_path)])
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer_config.json").unlink()
    assert "no tokenizer in" in one_line_error(capsys, [str(folder), str(out)])
    assert not out.exists()


def test_existing_out_is_kept_unless_forced(tmp_path, corpus, capsys):
    folder = model_folder(tmp_path / "m", corpus["tokenizer"], vocab_size=576)
    out = tmp_path / "m.gguf"
    out.write_bytes(b"precious")
    assert "exists; pass --force" in one_line_error(capsys, [str(folder), str(out)])
    assert out.read_bytes() == b"precious"
    assert main([str(folder), str(out), "--force"]) == 0
    assert len(gguf.GGUFReader(out).tensors) == 2 + 9 * 2 + 1  # embd, norm, output, 9 per layer
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["m.gguf"]  # no temp file left


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path, corpus, capsys,
                                                             monkeypatch):  # fmt: skip
    folder = model_folder(tmp_path / "m", corpus["tokenizer"], vocab_size=576)
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full_disk)
    err = one_line_error(capsys, [str(folder), str(out), "--force"])
    assert "No space left on device" in err
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["m.gguf"]


def test_cli_runs_as_a_module(tmp_path, corpus):
    folder = model_folder(tmp_path / "m", corpus["tokenizer"], vocab_size=576)
    p = subprocess.run(
        [sys.executable, "-m", "octo.export_gguf", str(folder), str(tmp_path / "m.gguf")],
        env=child_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "wrote" in p.stdout and "llama-completion -m" in p.stdout
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["general.file_type"].contents() == 1  # f16


# ----- llama.cpp itself ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("tokenizer", ["gpt2", "octo"])
def test_llama_cpp_runs_the_file_to_octos_logits_and_greedy_tokens(
    tmp_path, gpt2_tokenizer_dir, corpus, tokenizer
):
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama.cpp's Python binding is not installed (pip install "
        "llama-cpp-python builds it from source)"
    )  # fmt: skip
    from transformers import AutoTokenizer

    tok_dir, vocab = (gpt2_tokenizer_dir, GPT2_VOCAB) if tokenizer == "gpt2" else (
        corpus["tokenizer"], 576)  # fmt: skip
    folder = model_folder(tmp_path / "m", tok_dir, vocab_size=vocab, num_key_value_heads=2)
    out = export_gguf(folder, tmp_path / "m.gguf", dtype="f32")
    prompt = 'Once upon a time, Tom\'s 3 cats   saw a big red ball.\nThey said: "Hello!"'
    ids = AutoTokenizer.from_pretrained(str(folder))(prompt).input_ids

    # an f32 KV cache (llama.cpp's default is f16) and no flash attention (f16 inside, on CPU), so
    # llama.cpp computes in f32 like Octo: logits then agree to 2.4e-6 (3e-3 with the f16 KV
    # cache, 4e-3 with flash attention; measured with llama-cpp-python 0.3.36)
    f32 = llama_cpp.GGML_TYPE_F32
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=128, logits_all=True, verbose=False,
                          n_threads=2, type_k=f32, type_v=f32, flash_attn=False)  # fmt: skip
    assert llm.tokenize(prompt.encode(), add_bos=False, special=False) == ids
    llm.eval(ids)
    cpp_logits = torch.tensor(llm.scores[: len(ids)])  # (T, V)
    model = OctoForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]  # (T, V)
    torch.testing.assert_close(cpp_logits, logits, rtol=1e-5, atol=1e-5)

    llm.reset()
    greedy = []
    for token in llm.generate(ids, top_k=1, temp=0.0, reset=True):
        greedy.append(token)
        if len(greedy) == 20:
            break
    octo = model.generate(torch.tensor([ids]), max_new_tokens=20, temperature=0.0)
    llm.close()
    assert greedy == octo[0, len(ids) :].tolist()
