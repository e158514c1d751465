"""The Trainer's step on synthetic tokens (CPU, fp32, tiny model): gradient accumulation, the
schedule, parameter groups, non-finite steps, SIGTERM and exact resume."""

from __future__ import annotations

import json
import math
import os
import signal
from contextlib import nullcontext

import pytest
import torch

from octo import OctoConfig, OctoForCausalLM
from tests.fakes import ListData
from train.config import ConfigError, TrainConfig
from train.loop import Trainer
from train.optim import LRSchedule, param_groups, planned_steps

VOCAB, T = 96, 32
MODEL = OctoConfig.preset("tiny", vocab_size=VOCAB, max_position_embeddings=64)


def make_cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(batch_size=8, block_size=T, gradient_accumulation_steps=1, max_steps=20,
                warmup_steps=2, learning_rate=3e-3, log_interval_steps=5, eval_interval_steps=1000,
                save_interval_steps=1000, log_dir=str(tmp_path / "logs"),
                checkpoint_dir=str(tmp_path / "ckpt"), seed=1)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def random_batches(n: int, batch: int = 8, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, T), generator=g) for _ in range(n)]


def test_accumulation_equals_one_big_batch(tmp_path):
    """8 x 1, 2 x 4 and the uneven 2 + 6 give the gradient of the mean loss over all 8 rows (an
    uneven split catches a mean of per-micro-batch means; the pre-clip norm is checked against
    plain autograd, since Adam's first update is blind to the gradient's scale)."""
    ids = random_batches(1)[0]  # (8, T)
    torch.manual_seed(1)  # the Trainer seeds cfg.seed=1 before building its model
    ref = OctoForCausalLM(MODEL)
    ref(ids, labels=ids).loss.backward()  # mean over all 8 * (T - 1) targets
    ref_norm = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()])

    splits = {"8x1": [ids], "2x4": list(ids.split(2)), "2+6": [ids[:2], ids[2:]]}
    grads, updates = {}, {}
    for name, micro in splits.items():
        tr = Trainer(make_cfg(tmp_path, gradient_accumulation_steps=len(micro)), MODEL)
        assert torch.equal(tr.model.lm_head.weight, ref.lm_head.weight)  # same initial weights
        before = [p.detach().clone() for p in tr.model.parameters()]
        tr.optimizer.register_step_pre_hook(  # the (clipped) gradients the update is made from
            lambda opt, a, k, name=name, ps=tr._params: grads.update(
                {name: [p.grad.clone() for p in ps]}
            )
        )
        stats = tr.train_step(micro)
        assert stats.n_targets == 8 * (T - 1)
        torch.testing.assert_close(stats.grad_norm, ref_norm, rtol=1e-5, atol=0, msg=name)
        updates[name] = [p.detach() - b for p, b in zip(tr.model.parameters(), before)]
    for name in splits:
        for g, g0 in zip(grads[name], grads["8x1"]):
            torch.testing.assert_close(g, g0, rtol=1e-5, atol=1e-8, msg=name)
        # Adam's step is lr * g / (|g| + eps): about lr per element, and for |g| near eps it
        # amplifies fp32 rounding of g by up to ~1/eps; agreement to 0.1% of lr is the claim.
        for u, u0 in zip(updates[name], updates["8x1"]):
            torch.testing.assert_close(u, u0, rtol=0, atol=1e-3 * 3e-3, msg=name)


@pytest.mark.parametrize("max_norm", [0.01, 0.0])
def test_gradients_are_clipped_to_max_grad_norm(tmp_path, max_norm):
    """The optimizer steps from gradients of global norm max_grad_norm when they were larger (the
    logged grad_norm stays the pre-clip norm); max_grad_norm 0 leaves them as they are."""
    ids = random_batches(1)[0]
    tr = Trainer(make_cfg(tmp_path, max_grad_norm=max_norm), MODEL)
    seen = {}
    tr.optimizer.register_step_pre_hook(
        lambda opt, a, k: seen.update(norm=torch.nn.utils.get_total_norm(
            [p.grad for p in tr._params]))
    )  # fmt: skip
    stats = tr.train_step([ids])
    assert float(stats.grad_norm) > 0.1
    want = max_norm if max_norm else float(stats.grad_norm)
    assert float(seen["norm"]) == pytest.approx(want, rel=1e-5)


def test_schedule_follows_the_formula():
    peak, floor, W, S = 1e-3, 1e-4, 10, 110
    cos = LRSchedule(peak, W, S, "cosine", 0.1)
    assert cos(0) == pytest.approx(peak / W) and cos(4) == pytest.approx(peak * 5 / W)
    assert cos(W - 1) == pytest.approx(peak) and cos(W) == pytest.approx(peak)
    for s in (W, 37, 60, 99, S - 1):
        p = (s - W) / (S - 1 - W)
        assert cos(s) == pytest.approx(floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * p)))
    assert cos(S - 1) == pytest.approx(floor) and cos(S + 50) == pytest.approx(floor)
    lrs = [cos(s) for s in range(W, S)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    lin = LRSchedule(peak, W, S, "linear", 0.1)
    assert lin(W + 49) == pytest.approx(peak - (peak - floor) * 49 / 99)
    assert LRSchedule(peak, W, S, "constant", 0.1)(S + 5) == peak
    assert LRSchedule(peak, 0, S, "cosine", 0.0)(0) == peak  # no warmup: the peak at once


def test_trainer_applies_the_scheduled_lr(tmp_path):
    tr = Trainer(make_cfg(tmp_path, warmup_steps=3, max_steps=6, lr_schedule="linear"), MODEL)
    for s, ids in enumerate(random_batches(6)):
        stats = tr.train_step([ids])
        assert stats.lr == tr.schedule(s) == tr.optimizer.param_groups[0]["lr"]
    assert tr.step == 6 and stats.lr == pytest.approx(3e-3 * 0.1)


class ArrayTokens:
    """A token cache in memory, with the two reads PretokTrainData makes."""

    def __init__(self, n: int) -> None:
        self.ids = torch.arange(n) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def read(self, start, out):
        out[:] = self.ids[start : start + len(out)].numpy()

    def blocks(self, first, n, block_size):
        return self.ids[first * block_size : (first + n) * block_size].reshape(n, -1).numpy()


@pytest.mark.parametrize("world", [1, 2])
def test_planned_steps_are_the_steps_the_data_yields(tmp_path, world):
    """num_epochs of pre-tokenized data on 1 or 2 ranks: the schedule spans exactly the optimizer
    steps each rank's batches make (2 ranks once planned half of them: they counted one rank's
    tokens against the global step)."""
    from train.data.pretok import PretokTrainData

    cfg = make_cfg(tmp_path, max_steps=None, num_epochs=3, batch_size=2,
                   gradient_accumulation_steps=2)  # fmt: skip
    data = PretokTrainData(cfg, ArrayTokens(10_000), tmp_path, rank=world - 1, world_size=world)
    yielded = sum(1 for _ in data)
    steps, _ = planned_steps(cfg, data, world)
    assert steps == yielded // 2 and steps == 3 * (10_000 // T // (2 * world)) // 2
    assert planned_steps(make_cfg(tmp_path, max_steps=7), None)[0] == 7
    with pytest.raises(ConfigError, match="set max_steps, or set pretokenize: true"):
        planned_steps(cfg, iter([]))


def test_pretokenize_null_counts_tokens_when_no_max_steps(tmp_path):
    """The seed's config sets neither max_steps nor pretokenize: it must read a counted cache
    (num_epochs needs a length); with max_steps set, or pretokenize given, that decides."""
    assert make_cfg(tmp_path, max_steps=None).pretokenized
    assert not make_cfg(tmp_path, max_steps=10).pretokenized
    assert not make_cfg(tmp_path, max_steps=None, pretokenize=False).pretokenized
    assert make_cfg(tmp_path, max_steps=10, pretokenize=True).pretokenized


def test_no_weight_decay_on_norms_biases_embeddings():
    m = OctoForCausalLM(OctoConfig.preset("tiny", attention_bias=True, tie_word_embeddings=True))
    decay, no_decay = param_groups(m, 0.1)
    names = {id(p): n for n, p in m.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    nd = {names[id(p)] for p in no_decay["params"]}
    assert {n for n in names.values() if "norm" in n or n.endswith("bias")} <= nd
    assert "model.embed_tokens.weight" in nd  # tied: lm_head is the same tensor, listed once
    assert all(p.ndim == 2 and "embed" not in names[id(p)] for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))


def nan_switch(trainer: Trainer) -> dict:
    """A forward hook that makes the final norm's output NaN (so the loss) while flag["on"]."""
    flag = {"on": False}
    trainer.model.model.norm.register_forward_hook(
        lambda mod, inp, out: out * float("nan") if flag["on"] else out
    )
    return flag


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_nonfinite_step_is_skipped_and_counted(tmp_path, optimizer):
    tr = Trainer(make_cfg(tmp_path, optimizer=optimizer), MODEL)
    flag = nan_switch(tr)
    batches = random_batches(3)
    tr.train_step([batches[0]])
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    opt_before = {k: v.clone() for k, v in tr.optimizer.state[tr._params[0]].items()}
    flag["on"] = True
    stats = tr.train_step([batches[1]])
    assert bool(stats.skipped) and math.isnan(stats.loss())
    assert (tr.nonfinite_skips, tr.consecutive_nonfinite, tr.step) == (1, 1, 2)
    for k, v in tr.model.state_dict().items():
        assert torch.equal(v, before[k]), k  # the update was not applied
    for k, v in tr.optimizer.state[tr._params[0]].items():
        assert torch.equal(v, opt_before[k]), k  # nor Adam's moments or step (Muon's momentum)
    flag["on"] = False
    stats = tr.train_step([batches[2]])
    assert not bool(stats.skipped) and tr.consecutive_nonfinite == 0 and tr.nonfinite_skips == 1
    assert not torch.equal(tr.model.lm_head.weight, before["lm_head.weight"])


def test_consecutive_nonfinite_stops_with_last_good_checkpoint(tmp_path):
    cfg = make_cfg(tmp_path, max_consecutive_nonfinite=3, log_interval_steps=1)
    tr = Trainer(cfg, MODEL, train_data=ListData(random_batches(20)))
    flag = nan_switch(tr)
    tr.model.register_forward_pre_hook(lambda m, a: flag.update(on=tr.step >= 2))
    good_copy = {}
    orig = tr.train_step

    def step(micro):  # remember the weights after the last good step (step 2)
        if tr.step == 2:
            good_copy.update({k: v.clone() for k, v in tr.model.state_dict().items()})
        return orig(micro)

    tr.train_step = step
    result = tr.fit()
    tr.log.close()
    assert result.status == "nonfinite" and result.step == 5
    assert tr.nonfinite_skips == 3
    saved = OctoForCausalLM.from_pretrained(result.checkpoint)
    for k, v in saved.state_dict().items():
        assert torch.equal(v, good_copy[k]), k
    text = tr.log.log_path.read_text()
    assert "3 non-finite steps in a row" in text and "skipped (3 in a row, 3 in total)" in text


def run_losses(tr: Trainer) -> list[float]:
    tr.fit()
    tr.log.close()
    records = [json.loads(line) for line in tr.log.jsonl_path.read_text().splitlines()]
    return [r["loss"] for r in records if r["type"] == "train"]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_sigterm_saves_and_resume_is_exact(tmp_path, optimizer):
    """SIGTERM mid-run: the step finishes, a checkpoint is written, fit returns "interrupted";
    a new Trainer resumed from it logs the same per-step losses as an uninterrupted run."""
    batches = random_batches(12)
    kw = dict(max_steps=10, log_interval_steps=1, gradient_accumulation_steps=2,
              optimizer=optimizer)  # fmt: skip
    straight = run_losses(Trainer(make_cfg(tmp_path / "a", **kw), MODEL,
                                  train_data=ListData(batches)))  # fmt: skip

    cfg = make_cfg(tmp_path / "b", **kw)
    tr = Trainer(cfg, MODEL, train_data=ListData(batches))
    tr.model.register_forward_pre_hook(
        lambda m, a: os.kill(os.getpid(), signal.SIGTERM) if tr.step == 4 else None
    )
    first = run_losses(tr)
    assert tr._stop_signal == "SIGTERM" and tr.step == 5
    ckpt = tmp_path / "b" / "ckpt" / "checkpoint_step_5"
    assert (ckpt / "trainer_state.json").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(
        signal.getsignal(signal.SIGTERM)
    )
    tr2 = Trainer(make_cfg(tmp_path / "c", **kw), MODEL, train_data=ListData(batches))
    tr2.resume(ckpt)
    rest = run_losses(tr2)
    assert first + rest == straight  # bit-identical, step by step


def test_profile_timings_only_when_asked(tmp_path):
    tr = Trainer(make_cfg(tmp_path), MODEL)
    assert tr.train_step(random_batches(1)).timings is None
    tr.profile = True
    t = tr.train_step(random_batches(1)).timings
    assert set(t) == {"forward_backward", "optimizer"} and all(v > 0 for v in t.values())


# ATen ops that read a device value back to the host (item(), bool(), float(), data-dependent
# shapes): on a GPU each one stalls the host until the GPU catches up.
HOST_READS = ("_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal",
              "unique", "repeat_interleave")  # fmt: skip


class HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Records where an op of HOST_READS is dispatched (the op and the innermost Octo frame)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(name in str(func) for name in HOST_READS):
            import traceback

            ours = [f for f in traceback.extract_stack() if "/tests/" not in f.filename
                    and f"{os.sep}torch{os.sep}" not in f.filename]  # fmt: skip
            where = f"{ours[-1].filename}:{ours[-1].lineno}" if ours else "?"
            self.found.append(f"{func} at {where}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kernels,compile", [("triton", "auto"), ("torch", "auto"),
                                              ("torch", "graph")])  # fmt: skip
def test_train_step_does_not_read_the_device(tmp_path, kernels, compile):
    """Issue 8: no host sync in the hot loop. A step (accumulation 2, clipping, fused AdamW,
    the skip bookkeeping and the interval meter) dispatches no op that reads a device value back
    (on the GPU those stall the host, which is what bounds Octo's step). The one read allowed is
    the reference cross-entropy's label-range check, which its contract asks for (a clear error
    for a label outside the vocabulary; the Triton path gives NaN instead). The Triton ops'
    insides are not seen here (they run as one op); they hold no host read (the kernel tests
    run them under torch.cuda.set_sync_debug_mode("error") on a GPU). compile=graph's CPU
    stand-in (train/cudagraph.py: copy-in, loss scale, gradient checks, replay as a direct call)
    adds none either (the compiled model runs eagerly while recorded: Dynamo refuses to trace
    under a dispatch mode, and the model's own ops are the eager cases' business)."""
    cfg = make_cfg(tmp_path, kernels=kernels, compile=compile, batch_size=4,
                   gradient_accumulation_steps=2)  # fmt: skip
    tr = Trainer(cfg, MODEL, graph_stand_in=compile == "graph")
    batches = random_batches(2, batch=4)
    tr.train_step(batches)  # the first step builds the optimizer state
    tr.train_step(batches)  # compile=graph: the second step's first micro-batch is captured
    eager = torch.compiler.set_stance("force_eager") if compile == "graph" else nullcontext()
    with eager, HostReads() as reads:
        tr.train_step(batches)
    if compile == "graph":
        assert (tr._graph.captures, tr._graph.replays) == (1, 4)
    allowed = "octo_kernels/cross_entropy.py" if kernels == "torch" else None
    unexpected = [r for r in reads.found if allowed is None or allowed not in r]
    assert unexpected == [], unexpected
    if kernels == "torch":
        assert len(reads.found) == 2, reads.found  # the check, once per micro-batch


@pytest.mark.gpu
@pytest.mark.parametrize("compile", ["on", "graph"])
def test_gpu_step_does_not_synchronize(tmp_path, compile):
    """On a GPU the default path (bf16, Triton kernels, torch.compile) runs a step with no
    synchronizing CUDA call at all: torch.cuda.set_sync_debug_mode("error") raises on any.
    (The loop's one wait, on the previous step's skip flags, is an event wait it allows.) So
    does compile=graph once captured: copy-in, replays, the optimizer outside the graph."""
    cfg = make_cfg(tmp_path, device="cuda", precision="bf16", kernels="triton", compile=compile,
                   batch_size=4, gradient_accumulation_steps=2)  # fmt: skip
    tr = Trainer(cfg, MODEL)
    batches = random_batches(2, batch=4)
    for _ in range(2):  # compile, optimizer state; compile=graph: 2 warmups, the capture
        tr.train_step(batches)
    if compile == "graph":
        assert (tr._graph.captures, tr._graph.failure) == (1, None)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = tr.train_step(batches)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert math.isfinite(stats.loss())


@pytest.mark.slow
def test_compiled_step_matches_eager(tmp_path):
    """compile=on (torch.compile(fullgraph=True) of the forward+loss, reference kernels on CPU)
    gives the eager losses and evaluation, step for step, within fp32 tolerance. compile=
    cudagraphs on a CPU is the same compiled code (no graphs on CPU tensors) with the loop's
    CUDA-graph bookkeeping (gradients allocated up front, zeroed instead of freed, a graph step
    marked per micro-batch), which must not change a bit of the result. One thread: with several,
    Inductor's CPU embedding backward adds rows with atomics in varying order, and AdamW turns
    the ~1e-8 gradient differences near zero into weight differences up to ~1e-6. And the step
    compiles once: no recompiles."""
    batches = random_batches(6, batch=4)
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _compare_compile_modes(tmp_path, batches, out)
    finally:
        torch.set_num_threads(threads)
    assert out["on"][0] == pytest.approx(out["off"][0], rel=1e-5)
    assert out["on"][1] == pytest.approx(out["off"][1], rel=1e-5)
    assert out["cudagraphs"][:2] == out["on"][:2]
    assert all(torch.equal(a, b) for a, b in zip(out["cudagraphs"][2], out["on"][2]))


def _compare_compile_modes(tmp_path, batches, out) -> None:
    from torch._dynamo.utils import counters

    for mode in ("off", "on", "cudagraphs"):
        cfg = make_cfg(tmp_path / mode, compile=mode, batch_size=4, gradient_accumulation_steps=2)
        tr = Trainer(cfg, MODEL, eval_data=batches[:2], graph_stand_in=mode == "cudagraphs")
        torch._dynamo.reset()
        counters.clear()
        losses = [tr.train_step(batches[2 * i : 2 * i + 2]).loss() for i in range(3)]
        out[mode] = (losses, tr.evaluate()["eval_loss"], [p.detach().clone() for p in tr._params])
        # compiled: one graph for training, one for evaluation (no_grad, eval mode), and no
        # recompile when training and evaluation take turns afterwards
        tr.train_step(batches[:2])
        tr.evaluate()
        assert counters["stats"]["unique_graphs"] == (0 if mode == "off" else 2), mode


def test_cudagraphs_is_one_process_only(tmp_path):
    """compile=cudagraphs under torchrun is one line naming the fix, not a failure mid-step."""
    from train.distributed import DistEnv

    env = DistEnv(rank=0, local_rank=0, world_size=2, group=True)
    with pytest.raises(ConfigError, match="cudagraphs.*one process.*compile on"):
        Trainer(make_cfg(tmp_path, compile="cudagraphs"), MODEL, env=env)


@pytest.mark.gpu
def test_cuda_graph_step_matches_compiled_step(tmp_path):
    """On a GPU, compile=cudagraphs (bf16, Triton kernels, accumulation 2) replays CUDA graphs
    (no graph skipped) and follows compile=on's losses and weights. The first try of CUDA graphs
    failed here with "accessing tensor output of CUDAGraphs that has been overwritten"
    (bench/NOTES.md)."""
    from torch._dynamo.utils import counters

    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, VOCAB, (4, T), generator=g) for _ in range(8)]
    out = {}
    for mode in ("on", "cudagraphs"):
        torch._dynamo.reset()
        counters.clear()
        cfg = make_cfg(tmp_path / mode, compile=mode, batch_size=4, gradient_accumulation_steps=2,
                       device="cuda", precision="bf16", kernels="triton")  # fmt: skip
        tr = Trainer(cfg, MODEL, eval_data=batches[:2])
        losses = [tr.train_step(batches[2 * i : 2 * i + 2]).loss() for i in range(4)]
        out[mode] = (losses, tr.evaluate()["eval_loss"], [p.detach().clone() for p in tr._params])
        if mode == "cudagraphs":
            inductor = dict(counters["inductor"])
            assert not inductor.get("cudagraph_skips"), inductor
            # graphs were recorded (each copies its non-static input, the ids, in): no skip alone
            # would also hold if reduce-overhead had not applied at all
            assert inductor.get("cudagraph_recorded_non_static_inputs", 0) > 0, inductor
    assert out["cudagraphs"][0] == pytest.approx(out["on"][0], rel=1e-3)
    assert out["cudagraphs"][1] == pytest.approx(out["on"][1], rel=1e-3)
    for a, b in zip(out["cudagraphs"][2], out["on"][2]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
