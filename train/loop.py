"""The Trainer: one optimizer step, evaluation, the run around them, checkpoints and resume.

One step (`train_step`) over A micro-batches (B, T): each one's summed token loss, backward with
the loss scaled by 1/(target tokens of the whole step), then the global gradient norm, clipping,
the scheduled lr and the update (the arithmetic: train/step.py). A step whose loss or gradient
norm is not finite is skipped on the device, counted, and after max_consecutive_nonfinite in a
row the run stops.

No host sync in the hot path: losses, norms and skip counts accumulate in device tensors, read once
per log interval (the skip counts one step late, train.step.SkipCounter).

`Trainer(cfg, model_cfg, train_data=..., eval_data=...)` then `fit()` is a run; run() passes the
Runtime it built (runtime=), a Trainer built directly builds its own (Runtime.build, from
device=/env= when given). A benchmark can build one with synthetic data and call
`train_step(micro_batches)` itself (profile=True adds per-phase timings, with the syncs that
timing needs; without it there are none).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from octo import OctoConfig, OctoForCausalLM
from train.checkpoint.dist import load_checkpoint_dist, save_checkpoint_dist
from train.checkpoint.resume import resume_warnings
from train.checkpoint.state import capture_rng_state, restore_rng_state
from train.config import TrainConfig
from train.cudagraph import MicroStepGraph
from train.distributed import DistEnv, all_reduce_sum, host_any, no_sync, wrap_model
from train.metrics import (
    IntervalMeter,
    RunLogger,
    flops_per_token,
    format_eval_line,
    log_interval,
    log_start,
    matmul_params,
    perplexity,
)
from train.optim import (
    LRSchedule,
    apply_hyperparameters,
    build_optimizer,
    planned_steps,
    schedule_change,
    set_lr,
)
from train.runtime import Precision, Runtime, seed_everything
from train.signals import finish_step_on_stop
from train.step import (
    SkipCounter,
    StepStats,
    apply_update,
    grad_norm,
    loss_scale,
    step_fault,
)


@dataclasses.dataclass
class FitResult:
    status: str  # "completed" | "interrupted" (SIGINT/SIGTERM) | "nonfinite"
    step: int
    checkpoint: Path | None  # the newest checkpoint, written or resumed from (None on ranks
    # that do not write and did not resume)
    signal: str | None = None
    eval: dict[str, float] | None = None


class Trainer:
    """Builds the model, optimizer, schedule and precision from the config, and trains."""

    def __init__(
        self,
        cfg: TrainConfig,
        model_cfg: OctoConfig,
        *,
        runtime: Runtime | None = None,
        train_data: Iterable[torch.Tensor] | None = None,
        eval_data: Iterable[torch.Tensor] | None = None,
        tokenizer: Any = None,
        model: torch.nn.Module | None = None,
        device: torch.device | None = None,
        env: DistEnv | None = None,
        logger: RunLogger | None = None,
        profile: bool = False,
        graph_stand_in: bool = False,
    ) -> None:
        self.cfg, self.train_data, self.eval_data = cfg, train_data, eval_data
        self.tokenizer = tokenizer
        self.profile, self._logger = profile, logger
        # device, env, precision, compile mode, kernels: decided once (train/runtime.py)
        self.rt = rt = runtime if runtime is not None else Runtime.build(
            cfg, device=device, env=env, graph_stand_in=graph_stand_in
        )  # fmt: skip
        seed_everything(cfg.seed)  # before the model's initialization
        self.model = (model if model is not None else OctoForCausalLM(model_cfg)).to(rt.device)
        if cfg.use_gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.wrapped = wrap_model(self.model, rt.env, cfg.parallelism,
                                  rt.precision.autocast_dtype, rt.compiled)  # fmt: skip
        self.optimizer = build_optimizer(self.wrapped, cfg, rt.device)
        self._fused = bool(self.optimizer.defaults.get("fused"))
        self._params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if rt.static_grads:
            # A graph replay overwrites its outputs, so a gradient must never *be* one: the
            # backward's first AccumulateGrad would adopt the graph's output buffer as p.grad and
            # the next micro-batch's replay would overwrite it. Gradients that exist before the
            # first backward (and are zeroed, not freed) are added into in place instead.
            for p in self._params:
                p.grad = torch.zeros_like(p)
        self.scaler = rt.precision.make_scaler()
        self.total_steps, self.steps_source = planned_steps(cfg, train_data, rt.env.world_size)
        self.schedule = LRSchedule.from_config(cfg, self.total_steps)
        wrapped = self.wrapped

        def forward_loss(ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> () fp32 summed loss
            return wrapped(ids, labels=ids, reduction="sum").loss

        # Several processes: wrap_model compiled inside DDP/FSDP2 (their hooks do not trace).
        self._forward_loss = forward_loss if rt.env.enabled else rt.compiled(forward_loss)
        self._graph = None  # compile=graph: each micro-batch's _micro_step as one CUDA graph
        if rt.compile == "graph":
            self._graph = MicroStepGraph(self._micro_step, self._params, rt.device,
                                         capture=rt.device.type == "cuda",
                                         log=lambda line: self.log.info(line))  # fmt: skip
        self.step, self.tokens_seen = 0, 0
        self.skips = SkipCounter(rt.device, rt.pin_memory)
        self.meter = IntervalMeter(rt.device, rt.env, self._flops_per_token())
        self._stop_signal: str | None = None
        # the newest complete checkpoint of this run (saved or resumed from; None on ranks other
        # than 0) and the step it holds (on every rank), so an unchanged state is not saved twice
        self.last_checkpoint: Path | None = None
        self._checkpoint_step: int | None = None

    @property
    def device(self) -> torch.device:
        return self.rt.device

    @property
    def env(self) -> DistEnv:
        return self.rt.env

    @property
    def precision(self) -> Precision:
        return self.rt.precision

    @property
    def consecutive_nonfinite(self) -> int:
        """Skipped steps in a row (host copy: one step late on a GPU)."""
        return self.skips.in_row

    @property
    def nonfinite_skips(self) -> int:
        """Skipped steps in total (host copy: one step late on a GPU)."""
        return self.skips.total

    @property
    def log(self) -> RunLogger:
        if self._logger is None:
            self._logger = RunLogger(self.cfg.log_dir, enabled=self.env.is_main)
        return self._logger

    # ----- one optimizer step -------------------------------------------------------------------

    def train_step(self, micro_batches: list[torch.Tensor]) -> StepStats:
        """Forward+backward over the micro-batches (B, T) int64, then clip and update (see the
        module docstring). Advances self.step."""
        cfg, dev, opt = self.cfg, self.device, self.optimizer
        timings = {} if self.profile else None
        t0 = self._clock(timings)
        n_targets = sum(OctoForCausalLM.count_targets(b) for b in micro_batches)
        scale = loss_scale(n_targets, self.env, dev)
        self.wrapped.train()
        loss_sum = torch.zeros((), dtype=torch.float32, device=dev)
        if self._graph is not None:
            self._graph.begin_step(scale)
        for i, ids in enumerate(micro_batches):
            if self._graph is not None:  # copies ids in; the loss is the graph's until next call
                loss_sum += self._graph(ids)
                continue
            ids = ids.to(dev, non_blocking=True)
            self._new_graph_step()
            with no_sync(self.wrapped, self.env, i == len(micro_batches) - 1):
                loss_sum += self._micro_step(ids, scale)
        t1 = self._clock(timings)
        if self.scaler is not None:
            self.scaler.unscale_(opt)
        norm = grad_norm(self._params, cfg.max_grad_norm)
        fault = step_fault(loss_sum, norm, self.scaler is not None, self.env)
        lr = self.schedule(self.step)
        set_lr(opt, lr)  # with muon, times each group's lr_scale (train.optim.set_lr)
        apply_update(opt, self.scaler, self._fused, fault)
        opt.zero_grad(set_to_none=not self.rt.static_grads)
        self.meter.add(~fault, loss_sum, n_targets, norm)
        self.skips.add(fault)
        self.step += 1
        self.tokens_seen += sum(b.numel() for b in micro_batches) * self.env.world_size
        t2 = self._clock(timings)
        if timings is not None:
            timings.update(forward_backward=t1 - t0, optimizer=t2 - t1)
        return StepStats(loss_sum, n_targets, norm, fault, lr, timings)

    def _micro_step(self, ids: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
        """Forward, loss and backward of one micro-batch (B, T) on the device, its loss scaled by
        1/N; returns its summed token loss, () fp32, detached. compile=graph captures exactly
        this (train/cudagraph.py), so it must not read a device value on the host."""
        with self.precision.autocast():
            loss = self._forward_loss(ids)  # () fp32, summed over the tokens of ids
        if self.scaler is None:
            (loss * scale).backward()
        else:  # a non-finite loss must give non-finite gradients, so the scaler skips:
            poison = loss.detach() - loss.detach() + 1.0  # 1.0 exactly, or NaN
            self.scaler.scale(loss * scale * poison).backward()
        return loss.detach()

    def _new_graph_step(self) -> None:
        """compile=cudagraphs: the outputs of the last forward (and its backward) are consumed,
        so the next replay may overwrite them. No-op otherwise."""
        if self.rt.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()

    def _flops_per_token(self) -> float:
        c = self.model.config
        n = matmul_params(self.model)
        return flops_per_token(n, c.num_hidden_layers, self.cfg.block_size, c.hidden_size)

    def _clock(self, timings: dict | None) -> float:
        if timings is None:
            return 0.0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    # ----- evaluation ---------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        """Mean token loss and perplexity over at most eval_max_batches eval batches (B, T)."""
        if self.eval_data is None:
            return None
        self.wrapped.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss sum, targets
        for ids in itertools.islice(self.eval_data, self.cfg.eval_max_batches):
            ids = ids.to(self.device, non_blocking=True)
            self._new_graph_step()
            with self.precision.autocast():
                totals[0] += self._forward_loss(ids)
            totals[1] += OctoForCausalLM.count_targets(ids)
        self.wrapped.train()
        loss_sum, n = all_reduce_sum(totals, self.env).tolist()
        if n == 0:
            return None
        loss = loss_sum / n
        return {"step": self.step, "eval_loss": loss, "eval_ppl": perplexity(loss)}

    # ----- the run ------------------------------------------------------------------------------

    def fit(self) -> FitResult:
        """Train to the planned step (or the end of the data), evaluating, logging and saving on
        the configured intervals; stop cleanly on SIGINT/SIGTERM or too many non-finite steps."""
        cfg, log = self.cfg, self.log
        log_start(self)
        log.start_progress(self.total_steps, self.step)
        # The handlers stay until the last save is done: a Ctrl-C during the final evaluation or
        # save ends the run as one in the loop does (the save finishes, exit 0), and Python's
        # default handler would abort that save instead.
        with finish_step_on_stop(self._request_stop, lambda: self._stop_signal is not None):
            data = iter(self.train_data)
            self.meter.restart(self.step, self.tokens_seen)
            status, last_eval = "completed", None
            seen_skips = self.nonfinite_skips
            while self.step < self.total_steps:
                batches = _next_micro_batches(data, cfg.gradient_accumulation_steps)
                if host_any(batches is None, self.env):  # one rank's data ended
                    if self.steps_source == "max_steps":
                        log.info(f"The data ran out after num_epochs={cfg.num_epochs} at step "
                                 f"{self.step} of max_steps={cfg.max_steps}; raise num_epochs "
                                 "to train longer")  # fmt: skip
                    break
                self.train_step(batches)
                log.advance()
                if self.nonfinite_skips > seen_skips:
                    seen_skips = self.nonfinite_skips
                    log.info(f"Step {self.step}: non-finite loss or gradient norm, optimizer step "
                             f"skipped ({self.consecutive_nonfinite} in a row, "
                             f"{self.nonfinite_skips} in total)")  # fmt: skip
                if self.consecutive_nonfinite >= cfg.max_consecutive_nonfinite:
                    status = "nonfinite"
                    break
                if self.step % cfg.log_interval_steps == 0:
                    log_interval(self)
                if self.step % cfg.eval_interval_steps == 0:
                    last_eval = self.meter.paused(self._evaluate_and_log)
                if self.step % cfg.save_interval_steps == 0:
                    self.meter.paused(self.save_checkpoint)
                if host_any(self._stop_signal is not None, self.env):  # a signal on any rank
                    status = "interrupted"
                    break
            if status == "completed" and (last_eval is None or last_eval["step"] != self.step):
                last_eval = self._evaluate_and_log()
            if self._checkpoint_step != self.step:  # not saved (or resumed from) at this step
                self.save_checkpoint()
            if status == "completed" and host_any(self._stop_signal is not None, self.env):
                status = "interrupted"  # during the final evaluation or save: no final model
        if status == "interrupted":
            self._stop_signal = self._stop_signal or "a signal to another process"
        last_ckpt = self.last_checkpoint
        if status == "nonfinite":
            log.info(f"Stopping at step {self.step}: {self.consecutive_nonfinite} non-finite steps "
                     f"in a row (max_consecutive_nonfinite={cfg.max_consecutive_nonfinite}); the "
                     f"last good weights are in {last_ckpt}. Lower learning_rate, check the data, "
                     "or use bf16/fp32 instead of fp16")  # fmt: skip
        log.record({"type": "end", "status": status, "step": self.step,
                    "tokens_seen": self.tokens_seen, "nonfinite_skips": self.nonfinite_skips,
                    "checkpoint": str(last_ckpt) if last_ckpt else None})  # fmt: skip
        return FitResult(status, self.step, last_ckpt, self._stop_signal, last_eval)

    def _evaluate_and_log(self) -> dict[str, float] | None:
        r = self.evaluate()
        if r is not None:
            self.log.info(format_eval_line(r))
            self.log.record({"type": "eval", **r})
        return r

    def _request_stop(self, name: str) -> None:
        """A stop signal (train.signals.finish_step_on_stop): finish the step, save, exit 0."""
        self._stop_signal = name

    # ----- checkpoints --------------------------------------------------------------------------

    def trainer_state(self) -> dict[str, Any]:
        """The contract's trainer_state: everything beyond model and optimizer that resume needs."""
        data = self.train_data
        return {
            "step": self.step, "epoch": getattr(data, "epoch", 0), "tokens_seen": self.tokens_seen,
            "scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "data": data.state_dict() if hasattr(data, "state_dict") else None,
            "rng": capture_rng_state(), "nonfinite_skips": self.skips.exact_total(),
            "batch_size": self.cfg.batch_size, "learning_rate": self.cfg.learning_rate,
            "world_size": self.env.world_size,
        }  # fmt: skip

    def save_checkpoint(self) -> Path | None:
        """checkpoint_dir/checkpoint_step_{step} (train.checkpoint.save_checkpoint's layout);
        called on every rank (FSDP gathers), written by rank 0 (train/checkpoint/dist.py)."""
        cfg = self.cfg
        path = save_checkpoint_dist(
            cfg.checkpoint_dir, self.step, model=self.model, optimizer=self.optimizer,
            trainer_state=self.trainer_state(), train_config=cfg, env=self.env,
            tokenizer=self.tokenizer, keep_last=cfg.keep_last_checkpoints,
            max_shard_size=cfg.max_shard_size,
        )  # fmt: skip
        self._checkpoint_step = self.step
        if path is not None:
            self.last_checkpoint = path
            self.log.info(f"Saved checkpoint {path}")
        return path

    def resume(self, path: str | Path) -> None:
        """Continue exactly from a checkpoint folder: weights, optimizer, step, scaler, data
        position and RNG. A changed batch size or learning rate is a warning."""
        state = load_checkpoint_dist(Path(path), model=self.model, optimizer=self.optimizer,
                                     env=self.env)  # this rank's data position and RNG  # fmt: skip
        apply_hyperparameters(self.optimizer, self.cfg)
        self.step, self.tokens_seen = int(state["step"]), int(state.get("tokens_seen", 0))
        self.skips.restore(int(state.get("nonfinite_skips", 0)))
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if state.get("data") is not None and hasattr(self.train_data, "load_state_dict"):
            self.train_data.load_state_dict(state["data"])
        if state.get("rng") is not None:
            restore_rng_state(state["rng"])
        warnings = resume_warnings(state, batch_size=self.cfg.batch_size,
                                   learning_rate=self.cfg.learning_rate,
                                   world_size=self.env.world_size)  # fmt: skip
        warnings.append(schedule_change(state.get("scheduler"), self.schedule, self.step))
        for line in filter(None, warnings):
            self.log.info(f"warning: {line}; continuing")
        self.last_checkpoint, self._checkpoint_step = Path(path), self.step
        self.log.info(f"Resumed from {path} at step {self.step}")


def _next_micro_batches(data: Iterator[torch.Tensor], n: int) -> list[torch.Tensor] | None:
    """The next n micro-batches, or None when the data ends (a partial step is dropped)."""
    batches = list(itertools.islice(data, n))
    return batches if len(batches) == n else None
