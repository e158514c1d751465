"""train/cudagraph.py's bookkeeping on a CPU (a small model, no torch.compile): static buffers,
copy-in, gradients accumulated in place, the loss scale, warmup / capture once / replay, recapture
after the weights move, and a failed capture going on uncaptured. The capture itself is the
CPU stand-in's direct call; tests/test_train_graph.py runs the Trainer's step through it."""

from __future__ import annotations

import pytest
import torch

from train.config import ConfigError, TrainConfig
from train.cudagraph import MicroStepGraph
from train.runtime import check_compile_mode

VOCAB, B, T = 11, 3, 5


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(VOCAB, 8), torch.nn.Linear(8, VOCAB))


def micro_step(model: torch.nn.Module):
    """The Trainer's micro-step in miniature: summed token loss, backward of loss * scale."""

    def fn(ids: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, VOCAB).float(), ids[:, 1:].reshape(-1), reduction="sum"
        )
        (loss * scale).backward()
        return loss.detach()

    return fn


def batches(n: int, batch: int = B) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (batch, T), generator=g) for _ in range(n)]


def plain_grads(steps: list[list[torch.Tensor]]) -> list[tuple[list[float], list[torch.Tensor]]]:
    """Per step: the micro-batch losses and the gradients, as the plain step makes them."""
    model = make_model()
    fn, out = micro_step(model), []
    for micro in steps:
        n = sum(b.shape[0] * (b.shape[1] - 1) for b in micro)
        losses = [fn(ids, 1.0 / n) for ids in micro]
        out.append((losses, [p.grad.clone() for p in model.parameters()]))
        model.zero_grad(set_to_none=True)
    return out


def graph_for(model: torch.nn.Module, **kw) -> tuple[MicroStepGraph, list[str]]:
    params = list(model.parameters())
    for p in params:
        p.grad = torch.zeros_like(p)
    lines: list[str] = []
    graph = MicroStepGraph(micro_step(model), params, torch.device("cpu"), capture=False,
                           log=lines.append, **kw)  # fmt: skip
    return graph, lines


def run_steps(graph, model, steps) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    out = []
    for micro in steps:
        graph.begin_step(1.0 / sum(b.shape[0] * (b.shape[1] - 1) for b in micro))
        losses = [graph(ids).clone() for ids in micro]  # the graph's output: cloned at once
        out.append((losses, [p.grad.clone() for p in model.parameters()]))
        for p in model.parameters():
            p.grad.zero_()  # the Trainer's zero_grad(set_to_none=False)
    return out


def assert_same(got, want) -> None:
    for (losses, grads), (losses0, grads0) in zip(got, want, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(losses, losses0, strict=True))
        assert all(torch.equal(a, b) for a, b in zip(grads, grads0, strict=True))


@pytest.mark.parametrize("accum", [1, 4])
def test_warmup_capture_replay_gives_the_plain_gradients(accum):
    """Two warmup calls, one capture, then replays: per micro-batch the plain step's loss and per
    step its accumulated gradient, bit for bit, in the same gradient tensors throughout."""
    steps = [batches(accum) for _ in range(3)]
    model = make_model()
    graph, lines = graph_for(model)
    buffers = [p.grad for p in model.parameters()]
    got = run_steps(graph, model, steps)
    assert_same(got, plain_grads(steps))
    assert all(p.grad is g for p, g in zip(model.parameters(), buffers))  # accumulated in place
    assert (graph.captures, graph.replays, graph.failure, lines) == (1, 3 * accum - 2, None, [])


def test_a_failed_capture_is_one_line_and_the_run_goes_on_uncaptured():
    """The capture raising (what a host sync inside it does on a GPU): one line, and every call
    from the failed one on runs directly, its gradient counted once."""

    class Failing:
        def capture(self, fn):
            raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    steps = [batches(2) for _ in range(3)]
    model = make_model()
    graph, lines = graph_for(model, make_graph=Failing)
    got = run_steps(graph, model, steps)
    assert_same(got, plain_grads(steps))
    assert graph.captures == graph.replays == 0
    assert lines == [graph.failure] and "\n" not in graph.failure
    assert graph.failure.startswith("compile 'graph': capturing the micro-batch as a CUDA graph "
                                    "failed (RuntimeError: operation not permitted when stream "
                                    "is capturing); continuing without CUDA graphs")  # fmt: skip


def test_replaced_gradients_are_restored_and_moved_weights_recaptured():
    """A .grad set to None or replaced between steps goes back to the graph's (zeroed) buffer;
    a parameter reallocated (new storage) drops the graph, which warms up and captures again."""
    steps = [batches(2) for _ in range(5)]
    model = make_model()
    graph, _ = graph_for(model)
    buffers = [p.grad for p in model.parameters()]
    got = run_steps(graph, model, steps[:2])  # warmup, capture, replay
    assert graph.captures == 1
    w = model[1].weight
    w.grad = None
    model[0].weight.grad = torch.full_like(model[0].weight, 7.0)
    buffers[1].fill_(3.0)  # stale content must not leak into the next step
    got += run_steps(graph, model, steps[2:3])
    assert all(p.grad is g for p, g in zip(model.parameters(), buffers))
    assert graph.captures == 1
    with torch.no_grad():
        w.data = w.data.clone()  # new storage: a replay would read the old one
    got += run_steps(graph, model, steps[3:])
    assert (graph.captures, graph.replays) == (2, 2 + 2 + 2)  # 2 warmups again, then capture
    assert_same(got, plain_grads(steps))


def test_another_shape_after_capture_runs_uncaptured():
    """A micro-batch whose shape differs from the captured one runs directly (the graph's
    buffers cannot hold it); the gradients stay those of the plain step."""
    steps = [batches(2), batches(2), [batches(1, batch=2)[0], batches(1)[0]]]
    model = make_model()
    graph, _ = graph_for(model)
    got = run_steps(graph, model, steps)
    assert_same(got, plain_grads(steps))
    assert (graph.captures, graph.replays) == (1, 3)


def test_gradients_must_exist_before():
    model = make_model()
    with pytest.raises(ValueError, match="grad allocated beforehand"):
        MicroStepGraph(micro_step(model), list(model.parameters()), torch.device("cpu"),
                       capture=False, log=print)  # fmt: skip


def test_graph_mode_needs_cuda_and_one_process(tmp_path):
    """compile=graph on a CPU, or under torchrun: one line naming the fix."""
    cfg = TrainConfig(compile="graph")
    line = (r"^compile 'graph' captures CUDA graphs and needs a CUDA device, but the device is "
            r"cpu; use compile on or off here$")  # fmt: skip
    with pytest.raises(ConfigError, match=line):
        check_compile_mode(cfg, False, torch.device("cpu"))
    with pytest.raises(ConfigError, match="'graph' runs in one process only; use compile on"):
        check_compile_mode(cfg, True, torch.device("cpu"))
    check_compile_mode(cfg, False, None)  # the Trainer's stand-in for tests
    from tests.test_train_step import MODEL, make_cfg
    from train.loop import Trainer

    with pytest.raises(ConfigError, match=line):  # a Trainer built directly checks it too
        Trainer(make_cfg(tmp_path, compile="graph"), MODEL)


def test_graph_mode_on_a_cpu_is_one_line_before_any_data(tmp_path, capsys):
    """python -m train with compile=graph on a CPU: exit 2, one line, before the (missing)
    dataset or tokenizer is read."""
    from tests.test_run_errors import run_main

    rc, err = run_main(tmp_path, capsys, pretokenize=False, compile="graph", device="cpu")
    assert rc == 2 and "\n" not in err, err
    assert err.startswith("error: compile 'graph' captures CUDA graphs and needs a CUDA"), err
