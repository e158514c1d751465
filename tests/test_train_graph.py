"""compile=graph through the Trainer. On a CPU the capture and replay are a direct call
(Trainer(graph_stand_in=True)); everything else -- static buffers, copy-in, gradients accumulated
in place, the loss scale, the replay bookkeeping, the skip of a non-finite step, evaluation
outside the graph, checkpoint and resume -- must give compile=on's plain step bit for bit. On a
GPU the captured step is checked against the uncaptured one."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from tests.fakes import ListData
from tests.test_train_step import MODEL, VOCAB, T, make_cfg, random_batches
from train.loop import Trainer


@pytest.fixture
def one_thread():
    """Inductor's CPU embedding backward adds rows with atomics in varying order on several
    threads: bit-for-bit comparisons of compiled steps need one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def poisoned(tr: Trainer, on: bool):
    """While on, the final norm's weight holds a NaN (changed in place, so a captured graph sees
    it too); the step's loss is NaN and the step must be skipped."""
    w = tr.model.model.norm.weight
    saved = w.detach().clone()
    if on:
        with torch.no_grad():
            w[0] = float("nan")
    return lambda: w.data.copy_(saved)


def run_mode(tmp_path, mode: str, accum: int, batches: list[torch.Tensor], precision) -> dict:
    cfg = make_cfg(tmp_path / mode, compile=mode, batch_size=2, gradient_accumulation_steps=accum,
                   max_grad_norm=0.05, precision=precision)  # fmt: skip
    tr = Trainer(cfg, MODEL, eval_data=batches[:2], graph_stand_in=mode == "graph")
    steps = []
    for s in range(4):
        restore = poisoned(tr, on=s == 2)
        st = tr.train_step(batches[s * accum : (s + 1) * accum])
        restore()
        steps.append((st.loss_sum.clone(), st.grad_norm.clone(), bool(st.skipped),
                      tr.consecutive_nonfinite, tr.nonfinite_skips))  # fmt: skip
    ev = tr.evaluate()["eval_loss"]
    steps.append(tr.train_step(batches[:accum]).loss_sum.clone())  # training after evaluation
    return {"steps": steps, "eval": ev, "trainer": tr,
            "params": [p.detach().clone() for p in tr._params],
            "adam": [{k: v.clone() for k, v in tr.optimizer.state[p].items()}
                     for p in tr._params]}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("accum,precision", [(1, "fp32"), (4, "fp32"), (4, "fp16")])
def test_graph_step_matches_plain_step(tmp_path, one_thread, accum, precision):
    """Four steps (the third non-finite and skipped), clipping active (max_grad_norm 0.05), an
    evaluation, one more step: compile=graph's losses, gradient norms, skip counts, weights and
    AdamW state equal compile=on's bit for bit, with 2 warmup micro-batches, one capture and
    replays for every later one. fp16: the GradScaler's scaling is inside the captured function,
    its unscale, skip and update outside."""
    batches = random_batches(4 * accum, batch=2)
    on, graph = (run_mode(tmp_path, mode, accum, batches, precision) for mode in ("on", "graph"))
    for s, (a, b) in enumerate(zip(graph["steps"][:4], on["steps"][:4], strict=True)):
        assert torch.equal(a[0], b[0]) or (a[0].isnan() and b[0].isnan()), s
        assert torch.equal(a[1], b[1]) or (a[1].isnan() and b[1].isnan()), s
        assert a[2:] == b[2:], s
    assert [st[2] for st in on["steps"][:4]] == [False, False, True, False]
    assert on["steps"][3][3:] == (0, 1)  # the skip was counted, and the next step was good
    assert all(float(st[1]) > 0.05 for i, st in enumerate(on["steps"][:4]) if i != 2)  # clipped
    assert graph["eval"] == on["eval"]
    assert torch.equal(graph["steps"][4], on["steps"][4])
    assert all(torch.equal(a, b) for a, b in zip(graph["params"], on["params"], strict=True))
    for sa, sb in zip(graph["adam"], on["adam"], strict=True):
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    g = graph["trainer"]._graph
    assert (g.captures, g.replays, g.failure) == (1, 5 * accum - 2, None)


def logged(tr: Trainer) -> list[tuple[str, float]]:
    tr.fit()
    tr.log.close()
    records = [json.loads(line) for line in tr.log.jsonl_path.read_text().splitlines()]
    return [(r["type"], r.get("loss", r.get("eval_loss"))) for r in records
            if r["type"] in ("train", "eval")]  # fmt: skip


@pytest.mark.slow
def test_graph_mode_saves_evaluates_and_resumes_exactly(tmp_path, one_thread):
    """compile=graph run by fit(): evaluation every 3 steps (outside the graph), SIGTERM after
    step 4 saves a checkpoint; a new Trainer resumed from it logs the same losses and evaluations
    as the uninterrupted run."""
    batches = random_batches(16, batch=2)
    evals = random_batches(2, batch=2, seed=5)
    kw = dict(compile="graph", max_steps=7, log_interval_steps=1, eval_interval_steps=3,
              batch_size=2, gradient_accumulation_steps=2)  # fmt: skip

    def trainer(name: str) -> Trainer:
        return Trainer(make_cfg(tmp_path / name, **kw), MODEL, train_data=ListData(batches),
                       eval_data=evals, graph_stand_in=True)  # fmt: skip

    straight = logged(trainer("a"))
    tr = trainer("b")
    step = tr.train_step

    def step_then_signal(micro):  # a Ctrl-C-like stop after step 4
        stats = step(micro)
        if tr.step == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return stats

    tr.train_step = step_then_signal
    first = logged(tr)
    assert tr._stop_signal == "SIGTERM" and tr.step == 4
    tr2 = trainer("c")
    tr2.resume(tmp_path / "b" / "ckpt" / "checkpoint_step_4")
    rest = logged(tr2)
    assert [t for t, _ in straight].count("eval") == 3  # steps 3, 6 and the end (7)
    assert first + rest == straight
    assert tr2._graph.captures == 1 and tr2._graph.failure is None


@pytest.mark.gpu
def test_captured_step_matches_uncaptured_step(tmp_path):
    """On a GPU at accumulation 4 (bf16, Triton kernels): compile=graph captures one CUDA graph
    and replays it, and its per-step losses and every gradient the optimizer steps from equal
    compile=on's within bf16 rounding (relative 2^-7, and 2^-7 of the tensor's largest element
    for the near-zero ones). Weights are not compared: AdamW's first steps move each weight by
    about lr whatever the gradient's size, so a near-zero gradient rounded to the other sign is a
    2 lr difference that says nothing about the capture."""
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, VOCAB, (4, T), generator=g) for _ in range(12)]
    out = {}
    for mode in ("on", "graph"):
        cfg = make_cfg(tmp_path / mode, compile=mode, batch_size=4, gradient_accumulation_steps=4,
                       device="cuda", precision="bf16", kernels="triton")  # fmt: skip
        tr = Trainer(cfg, MODEL)
        grads = []
        tr.optimizer.register_step_pre_hook(
            lambda opt, a, k, tr=tr, grads=grads: grads.append([p.grad.clone() for p in tr._params])
        )
        losses = [tr.train_step(batches[4 * i : 4 * i + 4]).loss() for i in range(3)]
        out[mode] = (losses, grads, tr._graph)
    graph = out["graph"][2]
    assert (graph.captures, graph.failure) == (1, None) and graph.replays == 3 * 4 - 2
    assert out["graph"][0] == pytest.approx(out["on"][0], rel=2**-7)
    for step, (ga, gb) in enumerate(zip(out["graph"][1], out["on"][1], strict=True)):
        for a, b in zip(ga, gb, strict=True):
            torch.testing.assert_close(a, b, rtol=2**-7, atol=2**-7 * float(b.abs().max()),
                                       msg=lambda m, step=step: f"step {step}: {m}")  # fmt: skip
