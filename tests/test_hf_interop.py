"""Octo against transformers' LlamaForCausalLM, through checkpoint folders, both directions.

Weights are randomised everywhere (norm weights and biases too, which init leaves at 1 and 0),
so a tensor loaded into the wrong place, or not at all, changes the logits.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from octo import OctoConfig, OctoForCausalLM
from octo.files import parse_size
from octo.hf_index import INDEX_NAME
from tests.fakes import randomize_

hf_logging.set_verbosity_error()
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# 1, 2 and 4 KV heads (of 4 query heads), bias on/off, tied/untied; one with transformers 5's
# rope_parameters carrying a non-default theta, so a theta that is not read would show.
INTEROP_CASES = [
    dict(num_key_value_heads=kv, attention_bias=bias, tie_word_embeddings=tie, rope_theta=theta)
    for kv, bias, tie, theta in [
        (1, False, False, 10000.0),
        (1, True, True, 500000.0),
        (2, False, True, 10000.0),
        (2, True, False, 10000.0),
        (4, False, False, 500000.0),
        (4, True, True, 10000.0),
    ]
]


def case_id(case: dict) -> str:
    c = case
    return (
        f"kv{c['num_key_value_heads']}-bias{c['attention_bias']:d}"
        f"-tie{c['tie_word_embeddings']:d}-theta{c['rope_theta']:g}"
    )


def octo_model(**overrides) -> OctoForCausalLM:
    return randomize_(OctoForCausalLM(OctoConfig.preset("tiny", **overrides)))


def hf_config(cfg: OctoConfig, attn_implementation: str = "sdpa") -> LlamaConfig:
    return LlamaConfig(**cfg.to_hf_dict(), attn_implementation=attn_implementation)


def hf_twin(model: OctoForCausalLM, attn_implementation: str = "sdpa") -> LlamaForCausalLM:
    """transformers' Llama with the same weights (through the state dict, no folder)."""
    hf = LlamaForCausalLM(hf_config(model.config, attn_implementation))
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return hf.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("case", INTEROP_CASES, ids=case_id)
def test_octo_folder_loads_in_transformers(case, tmp_path):
    model = octo_model(**case).eval()
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert len(json.loads((tmp_path / INDEX_NAME).read_text())["weight_map"]) > 0
    hf = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    rope = getattr(hf.config, "rope_parameters", None) or {"rope_theta": hf.config.rope_theta}
    assert rope["rope_theta"] == case["rope_theta"]  # transformers 5 | 4
    assert hf.config.num_key_value_heads == case["num_key_value_heads"]
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == case["tie_word_embeddings"]
    ids = torch.randint(0, 256, (2, 33))
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits  # (B, T, V)
    assert max_diff(ours, theirs) <= 1e-5


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("case", INTEROP_CASES, ids=case_id)
def test_transformers_folder_loads_in_octo(case, sharded, tmp_path):
    cfg = OctoConfig.preset("tiny", **case)
    hf = randomize_(LlamaForCausalLM(hf_config(cfg))).eval()
    hf.save_pretrained(tmp_path, max_shard_size="40KB" if sharded else "2GB")
    assert (tmp_path / INDEX_NAME).is_file() == sharded
    model = OctoForCausalLM.from_pretrained(tmp_path)
    assert model.config == cfg
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == cfg.tie_word_embeddings
    ids = torch.randint(0, 256, (2, 33))
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    assert max_diff(ours, theirs) <= 1e-5


def test_loss_matches_transformers_with_ignored_labels():
    model = octo_model(num_key_value_heads=2, attention_bias=True)
    hf = hf_twin(model)
    ids = torch.randint(0, 256, (3, 40))
    labels = ids.clone()
    labels[0, :10] = -100  # a masked prompt
    labels[1, 25:] = -100  # padding at the end
    labels[2, torch.randperm(40)[:15]] = -100  # scattered
    theirs = hf(ids, labels=labels).loss
    fused = model(ids, labels=labels)  # the linear cross-entropy path (no logits)
    assert fused.logits is None
    unfused = model(ids, labels=labels, return_logits=True)
    assert max_diff(fused.loss, theirs) <= 1e-6 and max_diff(unfused.loss, theirs) <= 1e-6
    # "sum" is over the non-ignored targets (shifted: position t predicts t+1)
    n_targets = (labels[:, 1:] != -100).sum()
    total = model(ids, labels=labels, reduction="sum").loss
    assert max_diff(total, theirs * n_targets) <= 1e-4


def test_gradients_match_transformers():
    model = octo_model(num_key_value_heads=1, attention_bias=True, tie_word_embeddings=True)
    hf = hf_twin(model)
    model.train(), hf.train()
    ids = torch.randint(0, 256, (2, 24))
    labels = ids.clone()
    labels[:, :5] = -100
    model(ids, labels=labels).loss.backward()
    hf(ids, labels=labels).loss.backward()
    theirs = dict(hf.named_parameters())
    for name, p in model.named_parameters():
        assert max_diff(p.grad, theirs[name].grad) <= 1e-6, name


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_matches_transformers(side):
    """attention_mask: real positions get transformers' logits (positions count from 0 in both);
    with right padding they equal the unpadded sequence's, and the loss skips padding targets."""
    model = octo_model(num_key_value_heads=2).eval()
    hf = hf_twin(model)
    B, T, n_pad = 3, 20, [0, 5, 19]
    ids = torch.randint(0, 256, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    for b, n in enumerate(n_pad):
        if n:
            mask[b, :n] = 0 if side == "left" else 1
            mask[b, T - n :] = 0 if side == "right" else mask[b, T - n :]
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits
        theirs = hf(ids, attention_mask=mask).logits
    real = mask.bool()
    assert torch.isfinite(ours).all()
    assert max_diff(ours[real], theirs[real]) <= 1e-5
    if side == "right":
        for b, n in enumerate(n_pad):
            with torch.no_grad():
                alone = model(ids[b : b + 1, : T - n]).logits[0]
            assert max_diff(ours[b, : T - n], alone) <= 1e-5
    # Octo learns neither to predict padding nor from padding (a padding query sees only itself,
    # by convention): in transformers' terms, a label is ignored when it or its predecessor is a pad
    keep = real & F.pad(real[:, :-1], (1, 0), value=True)
    labels = torch.where(keep, ids, torch.full_like(ids, -100))
    loss = model(ids, labels=ids, attention_mask=mask).loss
    assert max_diff(loss, hf(ids, labels=labels, attention_mask=mask).loss) <= 1e-6


def test_save_load_round_trip_bit_exact_with_several_shards(tmp_path):
    for dtype in (torch.float32, torch.bfloat16):
        model = octo_model(attention_bias=True).to(dtype)
        out = tmp_path / str(dtype)
        model.save_pretrained(out, max_shard_size="30KB")
        shards = sorted(p.name for p in out.glob("model-*.safetensors"))
        assert len(shards) >= 5, shards
        assert json.loads((out / "config.json").read_text())["torch_dtype"] == str(dtype)[6:]
        loaded = OctoForCausalLM.from_pretrained(out, dtype=dtype)
        ours, theirs = model.state_dict(), loaded.state_dict()
        assert ours.keys() == theirs.keys()
        for name in ours:
            assert ours[name].dtype == theirs[name].dtype and torch.equal(ours[name], theirs[name])
    # default dtype is float32 whatever the file holds (an exact upcast of bf16)
    loaded = OctoForCausalLM.from_pretrained(out)
    assert loaded.lm_head.weight.dtype == torch.float32
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.float())


def test_tied_model_round_trip_keeps_the_tie(tmp_path):
    model = octo_model(tie_word_embeddings=True)
    model.save_pretrained(tmp_path, max_shard_size="30KB")
    weight_map = json.loads((tmp_path / INDEX_NAME).read_text())["weight_map"]
    assert "lm_head.weight" not in weight_map  # transformers' convention for tied weights
    loaded = OctoForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_resave_into_same_folder_removes_stale_shards(tmp_path):
    model = octo_model()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    many = len(list(tmp_path.glob("model-*.safetensors")))
    model.save_pretrained(tmp_path)
    assert [p.name for p in tmp_path.glob("model*.safetensors")] == [
        "model-00001-of-00001.safetensors"
    ]
    assert many > 1
    assert torch.equal(
        OctoForCausalLM.from_pretrained(tmp_path).lm_head.weight, model.lm_head.weight
    )


def test_compiled_and_ddp_models_save_clean_names(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from octo.hf_io import save_pretrained

    model = octo_model()
    expected = set(model.state_dict())
    compiled = torch.compile(model)  # wraps lazily: nothing is traced until it is called
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    save_pretrained(compiled, tmp_path / "compiled")
    names = set(json.loads((tmp_path / "compiled" / INDEX_NAME).read_text())["weight_map"])
    assert names == expected
    # a state dict of a model whose layers were compiled one by one, handed in explicitly
    layer_compiled = {
        k.replace("layers.0.", "layers.0._orig_mod."): v for k, v in model.state_dict().items()
    }
    save_pretrained(model, tmp_path / "layers", state_dict=layer_compiled)
    names = set(json.loads((tmp_path / "layers" / INDEX_NAME).read_text())["weight_map"])
    assert names == expected

    started = not dist.is_initialized()
    if started:
        dist.init_process_group(
            "gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1
        )
    try:
        ddp = DistributedDataParallel(model)
        save_pretrained(ddp, tmp_path / "ddp")
    finally:
        if started:
            dist.destroy_process_group()
    names = set(json.loads((tmp_path / "ddp" / INDEX_NAME).read_text())["weight_map"])
    assert names == expected


def test_loading_never_unpickles(tmp_path, monkeypatch):
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained unpickled something")

    octo_model().save_pretrained(tmp_path)
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    OctoForCausalLM.from_pretrained(tmp_path)


def test_from_pretrained_device_dtype_and_rng(tmp_path):
    model = octo_model()
    model.save_pretrained(tmp_path)
    state = torch.get_rng_state()
    loaded = OctoForCausalLM.from_pretrained(tmp_path, device="cpu", dtype=torch.bfloat16)
    assert torch.equal(torch.get_rng_state(), state)  # built on meta: no random init drawn
    assert not loaded.training
    for name, p in loaded.state_dict().items():
        assert p.dtype == torch.bfloat16 and p.device.type == "cpu", name
        assert torch.equal(p, model.state_dict()[name].to(torch.bfloat16)), name


@pytest.mark.parametrize(
    "size", ["2GB", "500MB", "50KB", "1GiB", "3MiB", "7KiB", "5Gb", "80Mb", 1234, "1234"]
)
def test_parse_size_matches_transformers(size):
    from transformers.utils.hub import convert_file_size_to_int

    expected = int(size) if isinstance(size, str) and size.isdigit() else None
    expected = expected or convert_file_size_to_int(size)
    assert parse_size(size) == expected


@pytest.mark.parametrize("size", ["2 gigabytes", "GB", "1.5GB", "-1", 0, -5, True, 2.0, None])
def test_parse_size_rejects_nonsense(size):
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size(size)


# ----- clear one-line errors for broken folders ---------------------------------------------


@pytest.fixture
def saved(tmp_path):
    """A saved tiny model in several shards: (folder, model)."""
    model = octo_model()
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="40KB")
    return tmp_path / "ckpt", model


def load_error(path) -> str:
    with pytest.raises(ValueError) as info:
        OctoForCausalLM.from_pretrained(path)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def first_shard(folder):
    return sorted(folder.glob("model-*.safetensors"))[0]


def edit_json(path, **changes):
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def test_error_missing_folder_and_config(saved, tmp_path):
    assert "does not exist" in load_error(tmp_path / "nope")
    folder, _ = saved
    (folder / "config.json").unlink()
    assert "config.json" in load_error(folder)


def test_error_only_pickle_weights(tmp_path):
    OctoConfig.preset("tiny").to_json_file(tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    message = load_error(tmp_path)
    assert "pytorch_model.bin" in message and "never unpickles" in message


def test_error_no_weights(tmp_path):
    OctoConfig.preset("tiny").to_json_file(tmp_path / "config.json")
    assert "model.safetensors" in load_error(tmp_path)


@pytest.mark.parametrize("marked", [False, True], ids=["plain", "with_marker"])
def test_error_missing_shard(saved, marked):
    """One line naming the shard and the index that lists it, also in a folder with a
    completion marker (a checkpoint, final/), where it was a raw FileNotFoundError."""
    from octo.integrity import seal

    folder, _ = saved
    if marked:
        seal(folder, kind="model")
    shard = first_shard(folder)
    shard.unlink()
    message = load_error(folder)
    assert message.startswith(f"shard {shard} is missing, but {folder / INDEX_NAME} lists it")
    assert message.endswith("); the folder is incomplete: copy it again or re-save the model")


def test_error_truncated_shard(saved):
    folder, _ = saved
    shard = first_shard(folder)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    message = load_error(folder)
    assert shard.name in message and "truncated" in message


def test_error_missing_tensor(saved):
    folder, _ = saved
    index = json.loads((folder / INDEX_NAME).read_text())
    del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    (folder / INDEX_NAME).write_text(json.dumps(index))
    message = load_error(folder)
    assert "missing" in message and "model.layers.1.mlp.up_proj.weight" in message


def test_error_tensor_not_in_its_shard(saved):
    folder, _ = saved
    index = json.loads((folder / INDEX_NAME).read_text())
    name = "model.norm.weight"
    wrong = next(
        f for f in sorted(set(index["weight_map"].values())) if f != index["weight_map"][name]
    )
    index["weight_map"][name] = wrong
    (folder / INDEX_NAME).write_text(json.dumps(index))
    message = load_error(folder)
    assert name in message and wrong in message


def test_error_unexpected_tensors(saved):
    folder, _ = saved
    edit_json(folder / "config.json", num_hidden_layers=1)
    message = load_error(folder)
    assert "unexpected" in message and "model.layers.1." in message


def test_error_shape_mismatch(saved):
    folder, _ = saved
    edit_json(folder / "config.json", vocab_size=320)
    message = load_error(folder)
    assert "model.embed_tokens.weight" in message or "lm_head.weight" in message
    assert "(256, 64)" in message and "(320, 64)" in message


def test_error_corrupt_index(saved):
    folder, _ = saved
    (folder / INDEX_NAME).write_text("{not json")
    assert INDEX_NAME in load_error(folder)


@pytest.mark.parametrize(
    "changes, needle",
    [
        (dict(model_type="gpt2"), "not a Llama"),
        (dict(rope_parameters={"rope_type": "linear", "factor": 2.0}), "rope_type"),
        (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope_scaling"),
        (dict(mlp_bias=True), "mlp_bias"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(head_dim=32), "head_dim"),
        (dict(num_attention_heads=3, head_dim=None), "num_attention_heads=3"),
    ],
)
def test_error_unsupported_llama_variants(saved, changes, needle):
    folder, _ = saved
    edit_json(folder / "config.json", **changes)
    assert needle in load_error(folder)


def test_llama_config_without_kv_heads_means_one_per_head(tmp_path):
    d = OctoConfig.preset("tiny", num_key_value_heads=4).to_hf_dict()
    del d["num_key_value_heads"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert OctoConfig.from_json_file(tmp_path / "config.json").num_key_value_heads == 4


def test_untied_config_with_shared_weights_refuses_to_save(tmp_path):
    model = octo_model()
    model.lm_head.weight = model.model.embed_tokens.weight
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        model.save_pretrained(tmp_path)


@pytest.mark.gpu
def test_load_onto_gpu_in_bf16(tmp_path):
    model = octo_model(num_key_value_heads=2, attention_bias=True).eval()
    model.save_pretrained(tmp_path)
    gpu = OctoForCausalLM.from_pretrained(tmp_path, device="cuda", dtype=torch.bfloat16)
    assert all(p.is_cuda and p.dtype == torch.bfloat16 for p in gpu.parameters())
    ids = torch.randint(0, 256, (2, 33))
    with torch.no_grad():
        ours = gpu(ids.cuda()).logits.float().cpu()
        ref = model(ids).logits
        base = model.to(torch.bfloat16)(ids).logits.float()  # the same bf16 math on the CPU
    assert max_diff(ours, ref) <= 2 * max_diff(base, ref) + 1e-2
