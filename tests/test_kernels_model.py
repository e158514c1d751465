"""The tiny Octo trained with every fused kernel (RMSNorm, RoPE, linear + cross-entropy, and the
plain cross-entropy) against the same model on the references, and compiled with no graph break.

OCTO_KERNELS=triton runs the Triton kernels on CPU tensors through the interpreter (tests/
conftest.py sets TRITON_INTERPRET=1 without a GPU); OCTO_KERNELS=torch runs the references.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from octo import OctoConfig, OctoForCausalLM

STEPS = 20
B, T = 2, 24


def _batches(vocab: int) -> list[torch.Tensor]:
    """Two fixed batches, alternated: learnable by heart, so the curves fall and differ."""
    g = torch.Generator().manual_seed(1)
    two = [torch.randint(0, vocab, (B, T), generator=g) for _ in range(2)]
    return [two[i % 2] for i in range(STEPS)]


def _labels(ids: torch.Tensor) -> torch.Tensor:
    labels = ids.clone()
    labels[0, -5:] = -100  # a padded tail: ignored targets in every batch
    return labels


def _octo_ops(fn) -> Counter[str]:
    """How many times each octo:: torch.library op ran (forward and backward) inside fn()."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return Counter(e.name for e in prof.events() if e.name.startswith("octo::"))


def _train(backend: str, monkeypatch) -> tuple[list[float], OctoForCausalLM, set[str]]:
    """20 AdamW steps from one initialisation on fixed batches: per-step losses, the model, and
    the octo:: ops the first step ran."""
    monkeypatch.setenv("OCTO_KERNELS", backend)
    torch.manual_seed(0)
    model = OctoForCausalLM(OctoConfig.preset("tiny"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    losses, ops = [], set()
    for i, ids in enumerate(_batches(model.config.vocab_size)):

        def step(ids=ids):
            loss = model(ids, labels=_labels(ids)).loss  # fused linear + cross-entropy
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())

        if i == 0:
            ops = set(_octo_ops(step))
        else:
            step()
    return losses, model, ops


def test_training_curves_match_reference(monkeypatch):
    fused, fused_model, fused_ops = _train("triton", monkeypatch)
    ref, ref_model, ref_ops = _train("torch", monkeypatch)
    assert fused_ops == {
        "octo::rms_norm_fwd",
        "octo::rms_norm_bwd",
        "octo::rope",
        "octo::linear_cross_entropy_fwd",
    }, fused_ops  # every fused kernel ran ("mean": the gradients come out of the forward)
    assert ref_ops == set()
    assert ref[-1] < ref[0] - 0.3, f"the reference did not learn: {ref[0]:.3f} -> {ref[-1]:.3f}"
    # fp32 everywhere; the kernels reorder fp32 sums and Adam's normalised steps carry those
    # last-bit differences forward. Measured (2-core CPU, interpreter): losses within 1e-6,
    # parameters within 1e-5 after 20 steps; the bounds below are 10x that.
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(ref), rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(fused_model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-4, msg=f"parameter {name}")

    # the plain cross-entropy kernel, through the model's logits path
    ids = _batches(fused_model.config.vocab_size)[0]
    monkeypatch.setenv("OCTO_KERNELS", "triton")
    with_logits = fused_model(ids, labels=_labels(ids), return_logits=True)
    assert with_logits.logits is not None
    ran = _octo_ops(
        lambda: fused_model(ids, labels=_labels(ids), return_logits=True).loss.backward()
    )
    assert {"octo::cross_entropy_fwd", "octo::cross_entropy_bwd"} <= set(ran)
    monkeypatch.setenv("OCTO_KERNELS", "torch")
    ref_logits = fused_model(ids, labels=_labels(ids), return_logits=True)
    torch.testing.assert_close(with_logits.loss, ref_logits.loss, rtol=1e-5, atol=1e-5)


def test_compiled_model_fullgraph_matches_eager(monkeypatch):
    """torch.compile(fullgraph=True) of the model's forward + loss traces the octo:: ops (no
    graph break), the compiled graph calls them (not a decomposition or the references: a
    second call, after compiling, is profiled, so tracing's fake-tensor calls do not count),
    and its loss and gradients are the eager ones."""
    monkeypatch.setenv("OCTO_KERNELS", "triton")
    torch.manual_seed(0)
    model = OctoForCausalLM(OctoConfig.preset("tiny"))
    ids = _batches(model.config.vocab_size)[0]
    labels = _labels(ids)
    params = list(model.parameters())

    def step(m, ids, labels):
        return m(ids, labels=labels).loss

    loss = step(model, ids, labels)
    grads = torch.autograd.grad(loss, params)
    compiled = torch.compile(step, fullgraph=True)  # raises on any graph break
    loss_c = compiled(model, ids, labels)
    grads_c = torch.autograd.grad(loss_c, params)
    ran = _octo_ops(lambda: torch.autograd.grad(compiled(model, ids, labels), params))
    n = model.config.num_hidden_layers  # 2 norms a layer + the final one; rope fwd + bwd a layer
    want = {"rms_norm_fwd": 2 * n + 1, "rms_norm_bwd": 2 * n + 1, "rope": 2 * n,
            "linear_cross_entropy_fwd": 1}  # fmt: skip
    assert ran == {f"octo::{k}": v for k, v in want.items()}, ran
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-5)
    for (name, _), g, gc in zip(model.named_parameters(), grads, grads_c):
        torch.testing.assert_close(gc, g, rtol=1e-4, atol=1e-5, msg=f"gradient of {name}")


@pytest.mark.gpu
def test_gpu_bf16_autocast_training_matches_reference(monkeypatch):
    """On a GPU with bf16 autocast (how training runs), 20 steps on the fused kernels track the
    reference within bf16 noise."""

    def train(backend):
        monkeypatch.setenv("OCTO_KERNELS", backend)
        torch.manual_seed(0)
        model = OctoForCausalLM(OctoConfig.preset("tiny")).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for ids in _batches(model.config.vocab_size):
            ids = ids.cuda()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(ids, labels=_labels(ids)).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return torch.tensor(losses)

    fused, ref = train("triton"), train("torch")
    assert ref[-1] < ref[0] - 0.3
    torch.testing.assert_close(fused, ref, rtol=2e-2, atol=2e-2)
