"""OctoConfig validation and JSON, the model's parameters, init and gradient checkpointing.

Parity with transformers' Llama lives in test_hf_interop.py, generation in test_generation.py.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from octo import OctoConfig, OctoForCausalLM

SIZE_FIELDS = [
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
]


def config_error(**fields) -> str:
    with pytest.raises(ValueError) as info:
        OctoConfig.preset("tiny", **fields)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "fields, needles",
    [
        (dict(hidden_size=66), ["hidden_size=66", "num_attention_heads=4"]),
        (dict(num_key_value_heads=3), ["num_attention_heads=4", "num_key_value_heads=3"]),
        (dict(num_key_value_heads=8), ["num_attention_heads=4", "num_key_value_heads=8"]),
        (dict(hidden_size=12, num_key_value_heads=1), ["head_dim", "12 / 4 = 3", "odd"]),
        (dict(hidden_size=20, num_key_value_heads=1), ["head_dim", "20 / 4 = 5", "odd"]),
        (dict(rms_norm_eps=0.0), ["rms_norm_eps", "0.0"]),
        (dict(rope_theta=-1.0), ["rope_theta", "-1.0"]),
        (dict(initializer_range=0), ["initializer_range", "0"]),
        (dict(rms_norm_eps=float("nan")), ["rms_norm_eps", "nan"]),
        (dict(hidden_size="64"), ["hidden_size", "'64'"]),
        (dict(hidden_size=64.0), ["hidden_size", "64.0"]),
        (dict(num_hidden_layers=True), ["num_hidden_layers", "True"]),
        (dict(attention_bias=1), ["attention_bias", "1"]),
    ],
)
def test_impossible_configs_name_field_and_value(fields, needles):
    message = config_error(**fields)
    for needle in needles:
        assert needle in message, (needle, message)


@pytest.mark.parametrize("field", SIZE_FIELDS)
@pytest.mark.parametrize("value", [0, -4])
def test_non_positive_sizes(field, value):
    message = config_error(**{field: value})
    assert f"{field} must be positive, got {value}" in message


def test_unknown_key_names_the_nearest_field(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key 'hiden_size'; did you mean 'hidden_size'"):
        OctoConfig.from_dict({"hiden_size": 64})
    path = tmp_path / "model.json"
    path.write_text(json.dumps({**OctoConfig.preset("tiny").to_dict(), "n_layer": 2}))
    with pytest.raises(ValueError, match="unknown key 'n_layer'"):
        OctoConfig.from_json_file(path)
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        OctoConfig.preset("huge")


def test_config_is_frozen():
    """A validated config is only read: assigning a field would skip validate()."""
    cfg = OctoConfig.preset("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hidden_size = 65  # odd head_dim: validate() would refuse it
    assert dataclasses.replace(cfg, num_hidden_layers=3).num_hidden_layers == 3
    with pytest.raises(ValueError, match="head_dim"):
        dataclasses.replace(cfg, hidden_size=68)  # 68 / 4 heads = 17: odd


def test_bad_json_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        OctoConfig.from_json_file(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        OctoConfig.from_json_file(tmp_path / "broken.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        OctoConfig.from_json_file(tmp_path / "list.json")


def test_json_round_trips(tmp_path):
    cfg = OctoConfig.preset("tiny", attention_bias=True, tie_word_embeddings=True, rope_theta=5e5)
    cfg.to_json_file(tmp_path / "octo.json")
    assert OctoConfig.from_json_file(tmp_path / "octo.json") == cfg
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    assert OctoConfig.from_json_file(tmp_path / "config.json") == cfg


def test_seed_preset_parameter_count():
    cfg = OctoConfig.preset("seed")
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (16000, 768, 12)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (12, 3, 64)
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = OctoForCausalLM(cfg)
    C, F, V, L, kv = 768, 3072, 16000, 12, 3 * 64
    per_layer = C * C * 2 + C * kv * 2 + 3 * C * F + 2 * C  # q, o; k, v; gate, up, down; 2 norms
    assert model.num_parameters() == 2 * V * C + L * per_layer + C  # embed, lm_head, final norm
    assert model.num_parameters() == 127_224_576
    assert model.num_parameters(exclude_embeddings=True) == 127_224_576 - V * C


def test_llama_parameter_names_and_tying():
    model = OctoForCausalLM(OctoConfig.preset("tiny", attention_bias=True))
    names = set(model.state_dict())
    for name in [
        "model.embed_tokens.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.self_attn.q_proj.bias",
        "model.layers.0.self_attn.o_proj.bias",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.norm.weight",
        "lm_head.weight",
    ]:
        assert name in names, name
    untied = model.num_parameters()
    tied = OctoForCausalLM(OctoConfig.preset("tiny", attention_bias=True, tie_word_embeddings=True))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert tied.num_parameters() == untied - 256 * 64  # the shared matrix counts once


def test_init_statistics():
    """std 0.02 everywhere, residual output projections (o_proj, down_proj) 0.02 / sqrt(2 L),
    norms 1, biases 0. With >= 65k samples per matrix, the sample std is within ~0.3% (one
    sigma) of the truth, so 3% tolerance cannot pass a wrong scale (sqrt(2L) = 2.83 here)."""
    cfg = OctoConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_bias=True,
    )
    model = OctoForCausalLM(cfg)
    residual = 0.02 / math.sqrt(2 * cfg.num_hidden_layers)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith(".bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        else:
            expected = residual if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
            std, mean = p.double().std().item(), p.double().mean().item()
            assert abs(std / expected - 1) < 0.03, (name, std, expected)
            assert abs(mean) < 4 * expected / math.sqrt(p.numel()), (name, mean)


@pytest.mark.parametrize("tie", [False, True])
def test_gradient_checkpointing_gives_identical_gradients(tie):
    cfg = OctoConfig.preset("tiny", num_hidden_layers=3, tie_word_embeddings=tie)
    model = OctoForCausalLM(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    labels = ids.clone()
    labels[:, :3] = -100

    def grads(checkpointing: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        model.gradient_checkpointing_enable(checkpointing)
        loss = model(ids, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_plain, plain = grads(False)
    loss_ckpt, ckpt = grads(True)
    assert torch.equal(loss_plain, loss_ckpt)
    for name in plain:
        assert torch.equal(plain[name], ckpt[name]), name


def test_gradient_checkpointing_recomputes_in_backward():
    """It is on: each layer's forward starts twice per step (forward, then again in backward; a
    pre-hook, since the recomputation stops early once it has what backward needs)."""
    model = OctoForCausalLM(OctoConfig.preset("tiny")).train()
    calls = []
    model.model.layers[0].mlp.register_forward_pre_hook(lambda *args: calls.append(1))
    ids = torch.randint(0, 256, (1, 8))
    model.gradient_checkpointing_enable()
    model(ids, labels=ids).loss.backward()
    assert len(calls) == 2
    calls.clear()
    model.gradient_checkpointing_enable(False)
    model(ids, labels=ids).loss.backward()
    assert len(calls) == 1


@pytest.mark.slow  # two CPU compiles, ~30 s on a cold cache
@pytest.mark.parametrize("layer_checkpointing", [False, True])
def test_compiled_mlp_recomputes_the_swiglu_product(layer_checkpointing):
    """Under torch.compile the backward keeps gate and up of each MLP but not silu(gate) * up
    (recomputed there): 2 saved (B, T, F) tensors per layer, where eager keeps 4 and the
    compiled model without the checkpoint kept 3. Loss and gradients follow eager's, also with
    whole-layer checkpointing around it."""
    torch.manual_seed(0)
    cfg = OctoConfig.preset("tiny", num_hidden_layers=2)
    model = OctoForCausalLM(cfg).train()
    model.gradient_checkpointing_enable(layer_checkpointing)
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    n_tokens, width = ids.numel(), cfg.intermediate_size

    def run(fn):
        saved = []

        def pack(t):
            if t.numel() == n_tokens * width and t.shape[-1] == width:
                saved.append(t.untyped_storage().data_ptr())
            return t

        model.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = fn(ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        return loss.detach(), grads, len(set(saved))

    eager_loss, eager_grads, eager_saved = run(model)
    loss, grads, saved = run(torch.compile(model, fullgraph=True))
    if not layer_checkpointing:  # (with it, each layer keeps only its input)
        assert eager_saved == 4 * cfg.num_hidden_layers  # gate, up, silu(gate), the product
        assert saved == 2 * cfg.num_hidden_layers  # 3 without the checkpoint
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for name, g in eager_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_forward_rejects_too_long_and_bad_mask():
    model = OctoForCausalLM(OctoConfig.preset("tiny", max_position_embeddings=16))
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(torch.zeros(2, 8, dtype=torch.long), attention_mask=torch.ones(2, 7))


def test_all_ignored_labels_give_zero_loss_and_gradients():
    model = OctoForCausalLM(OctoConfig.preset("tiny"))
    ids = torch.randint(0, 256, (2, 8))
    loss = model(ids, labels=torch.full_like(ids, -100)).loss
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_count_targets_is_the_number_of_token_losses():
    """count_targets states the forward's shift rule: the summed loss over it is the mean loss."""
    model = OctoForCausalLM(OctoConfig.preset("tiny"))
    ids = torch.randint(0, 256, (3, 9))
    with torch.no_grad():
        losses = model(ids, labels=ids, reduction="none").loss
        total = model(ids, labels=ids, reduction="sum").loss
        mean = model(ids, labels=ids).loss
    assert OctoForCausalLM.count_targets(ids) == int((losses != 0).sum()) == 3 * 8
    torch.testing.assert_close(total / OctoForCausalLM.count_targets(ids), mean)
