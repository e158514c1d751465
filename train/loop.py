"""The Trainer: one optimizer step, evaluation, the run around them, checkpoints and resume.

One step (`train_step`), for micro-batches m = 1..A of token ids (B, T) (labels = ids, shifted in
the model):
    loss_m = sum of the token losses of m (model(..., reduction="sum"), fp32)
    backward of loss_m / N,  N = target tokens of ALL micro-batches of the step (and all ranks)
so the gradient is that of the mean token loss of the whole step, whatever A and B are. Then the
global gradient norm, clipping at max_grad_norm, the scheduled lr, and AdamW. A step whose loss or
gradient norm is not finite is skipped on the device (the fused AdamW's `found_inf`, or the
GradScaler's), counted, and after max_consecutive_nonfinite in a row the run stops.

No host sync in the hot path: losses, norms and skip counts accumulate in device tensors, read once
per log interval; the skip counters are copied to the host asynchronously and read one step late
(waiting only for the previous step, while the current one is queued on the GPU).

`Trainer(cfg, model_cfg, train_data=..., eval_data=...)` then `fit()` is a run; a benchmark can
build one with synthetic data and call `train_step(micro_batches)` itself (profile=True adds
per-phase timings, with the syncs that timing needs; without it there are none).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import signal
import threading
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
from train.distributed import (
    DistEnv,
    all_reduce_sum,
    any_rank,
    host_any,
    init_distributed,
    no_sync,
    replicated,
    wrap_model,
)
from train.metrics import (
    IntervalMeter,
    RunLogger,
    flops_per_token,
    format_eval_line,
    format_log_line,
    log_dir_error,
    matmul_params,
    perplexity,
    start_lines,
)
from train.muon import check_optimizer
from train.optim import (
    LRSchedule,
    apply_hyperparameters,
    build_optimizer,
    planned_steps,
    schedule_change,
    set_lr,
)
from train.runtime import (
    check_compile_mode,
    maybe_compile,
    resolve_device,
    resolve_precision,
    seed_everything,
    set_kernel_backend,
)


@dataclasses.dataclass
class StepStats:
    """What one train_step did. Tensors stay on the device (reading them syncs)."""

    loss_sum: torch.Tensor  # () fp32: summed token loss of the step on this rank
    n_targets: int  # target tokens of the step on this rank: sum over micro-batches of B * (T - 1)
    grad_norm: torch.Tensor  # () fp32: global gradient norm before clipping
    skipped: torch.Tensor  # () bool: non-finite loss or gradient norm; the update was not applied
    lr: float
    timings: dict[str, float] | None = None  # seconds per phase, only with Trainer(profile=True)

    def loss(self) -> float:
        """Mean token loss of the step (syncs)."""
        return float(self.loss_sum) / self.n_targets


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
        self.device = device if device is not None else resolve_device(cfg)
        self.env = env if env is not None else init_distributed(self.device)
        # graph_stand_in (tests only): compile=graph or cudagraphs on a CPU (graph: the capture
        # replaced by a direct call; cudagraphs: compiled code, no graphs on CPU tensors)
        check_compile_mode(cfg, self.env.enabled, None if graph_stand_in else self.device)
        check_optimizer(cfg, self.env.enabled)
        self._cuda_graphs = cfg.compile == "cudagraphs"
        self._static_grads = cfg.compile in ("cudagraphs", "graph")
        set_kernel_backend(cfg)
        seed_everything(cfg.seed)
        self.precision = resolve_precision(cfg, self.device)
        self.model = (model if model is not None else OctoForCausalLM(model_cfg)).to(self.device)
        if cfg.use_gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        compile_fn = functools.partial(maybe_compile, cfg=cfg, device=self.device)
        self.wrapped = wrap_model(self.model, self.env, cfg.parallelism,
                                  self.precision.autocast_dtype, compile_fn)  # fmt: skip
        self.optimizer = build_optimizer(self.wrapped, cfg, self.device)
        self._fused = bool(self.optimizer.defaults.get("fused"))
        self._params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self._static_grads:
            # A graph replay overwrites its outputs, so a gradient must never *be* one: the
            # backward's first AccumulateGrad would adopt the graph's output buffer as p.grad and
            # the next micro-batch's replay would overwrite it. Gradients that exist before the
            # first backward (and are zeroed, not freed) are added into in place instead.
            for p in self._params:
                p.grad = torch.zeros_like(p)
        self.scaler = self.precision.make_scaler()
        self.total_steps, self.steps_source = planned_steps(cfg, train_data, self.env.world_size)
        self.schedule = LRSchedule.from_config(cfg, self.total_steps)
        wrapped = self.wrapped

        def forward_loss(ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> () fp32 summed loss
            return wrapped(ids, labels=ids, reduction="sum").loss

        # Several processes: wrap_model compiled inside DDP/FSDP2 (their hooks do not trace).
        self._forward_loss = forward_loss if self.env.enabled else compile_fn(forward_loss)
        self._graph = None  # compile=graph: each micro-batch's _micro_step as one CUDA graph
        if cfg.compile == "graph":
            self._graph = MicroStepGraph(self._micro_step, self._params, self.device,
                                         capture=self.device.type == "cuda",
                                         log=lambda line: self.log.info(line))  # fmt: skip
        self.step, self.tokens_seen = 0, 0
        dev = self.device
        self._consecutive = torch.zeros((), dtype=torch.int64, device=dev)  # skips in a row
        self._skips = torch.zeros((), dtype=torch.int64, device=dev)  # skips in total
        self.meter = IntervalMeter(self.device, self.env, self._flops_per_token())
        self._flags_host = torch.zeros(2, dtype=torch.int64, pin_memory=dev.type == "cuda")
        self._flags_event = torch.cuda.Event() if dev.type == "cuda" else None
        self.consecutive_nonfinite = self.nonfinite_skips = 0  # host copies (one step late on GPU)
        self._stop_signal: str | None = None
        # the newest complete checkpoint of this run (saved or resumed from; None on ranks other
        # than 0) and the step it holds (on every rank), so an unchanged state is not saved twice
        self.last_checkpoint: Path | None = None
        self._checkpoint_step: int | None = None

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
        n_targets = sum(b.shape[0] * (b.shape[1] - 1) for b in micro_batches)
        scale = self._loss_scale(n_targets)
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
        if cfg.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self._params, cfg.max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm(
                [p.grad for p in self._params if p.grad is not None]
            )
        norm = replicated(norm)  # FSDP2: a replicated DTensor
        if self.scaler is None:
            fault = ~(torch.isfinite(loss_sum) & torch.isfinite(norm))
        else:  # gradient overflow is the scaler's business (it lowers the scale); NaN loss is ours
            fault = ~torch.isfinite(loss_sum)
        fault = any_rank(fault, self.env)  # every rank skips the same steps
        lr = self.schedule(self.step)
        set_lr(opt, lr)  # with muon, times each group's lr_scale (train.optim.set_lr)
        if self.scaler is not None:
            self.scaler.step(opt)
            self.scaler.update()
        elif self._fused:
            opt.found_inf = fault.float()  # fused AdamW skips the whole update on device when 1
            opt.step()
        elif not bool(fault):  # host sync: only optimizers without the fused kernel (Muon)
            opt.step()
        opt.zero_grad(set_to_none=not self._static_grads)
        self._count(fault, loss_sum, n_targets, norm)
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
        if self._cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()

    def _loss_scale(self, n_targets: int) -> float | torch.Tensor:
        """1/N with N the step's target tokens over all ranks. DDP/FSDP average gradients over
        ranks, hence world_size / N there (all_reduce of N: tensor, no host sync)."""
        if not self.env.enabled:
            return 1.0 / n_targets
        n = all_reduce_sum(torch.tensor(float(n_targets), device=self.device), self.env)
        return self.env.world_size / n

    def _count(self, fault: torch.Tensor, loss_sum, n_targets: int, norm: torch.Tensor) -> None:
        """Device-side bookkeeping of the step, then the (lagged) host copy of the skip counts."""
        good = ~fault
        self._consecutive = torch.where(fault, self._consecutive + 1, 0)
        self._skips += fault
        self.meter.add(good, loss_sum, n_targets, norm)
        if self._flags_event is not None:  # GPU: read the previous step's counts, then send these
            self._read_flags()
            self._flags_host.copy_(torch.stack([self._consecutive, self._skips]), non_blocking=True)
            self._flags_event.record()
        else:
            self._flags_host.copy_(torch.stack([self._consecutive, self._skips]))
            self._read_flags()

    def _read_flags(self) -> None:
        if self._flags_event is not None:
            self._flags_event.synchronize()
        self.consecutive_nonfinite, self.nonfinite_skips = self._flags_host.tolist()

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
            totals[1] += ids.shape[0] * (ids.shape[1] - 1)
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
        self._log_start()
        log.start_progress(self.total_steps, self.step)
        previous = self._install_signal_handlers()
        data = iter(self.train_data)
        self.meter.restart(self.step, self.tokens_seen)
        status, last_eval = "completed", None
        seen_skips = self.nonfinite_skips
        # The handlers stay until the last save is done: a Ctrl-C during the final evaluation or
        # save ends the run as one in the loop does (the save finishes, exit 0), and Python's
        # default handler would abort that save instead.
        try:
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
                    self._log_interval()
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
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
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

    def _log_interval(self) -> None:
        """The log line and its JSON record over the steps since the last one (one host sync)."""
        r = self.meter.record(self.step, self.tokens_seen, self.total_steps)
        lr = self.schedule(self.step - 1)
        r.update(lr=lr, optimizer=self.cfg.optimizer, nonfinite_skips=self.nonfinite_skips,
                 epoch=getattr(self.train_data, "epoch", 0))  # fmt: skip
        if self.cfg.optimizer == "muon":  # what each part stepped with (train.optim.set_lr)
            r["lr"] = lr * self.cfg.muon_adamw_lr_scale
            r["muon_lr"] = lr * self.cfg.muon_learning_rate / self.cfg.learning_rate
        self.log.info(format_log_line(r))
        self.log.record(r)

    def _evaluate_and_log(self) -> dict[str, float] | None:
        r = self.evaluate()
        if r is not None:
            self.log.info(format_eval_line(r))
            self.log.record({"type": "eval", **r})
        return r

    def _log_start(self) -> None:
        log, c = self.log, self.model.config
        if log.log_path is not None:  # the resolved configs, beside the log, before any line:
            stem = log.log_path.with_name(log.log_path.stem)  # a full log_dir is one error line
            path = Path(f"{stem}_config.json")
            try:
                self.cfg.save(path)
                path = Path(f"{stem}_model.json")
                c.to_json_file(path)
            except OSError as e:
                raise log_dir_error(self.cfg.log_dir, path, e) from None
        for line in start_lines(self):
            log.info(line)
        log.record({"type": "start", "step": self.step, "total_steps": self.total_steps,
                    "parameters": self.model.num_parameters(), "precision": self.precision.name,
                    "config": self.cfg.to_dict(), "model_config": c.to_dict()})  # fmt: skip

    def _install_signal_handlers(self) -> dict:
        """SIGINT/SIGTERM: finish the step, save, exit 0. A second Ctrl-C aborts at once (a
        KeyboardInterrupt: a save in progress is dropped whole, and run() names the last complete
        checkpoint, exit 130)."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def on_signal(signum: int, frame: Any) -> None:
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._stop_signal = signal.Signals(signum).name

        return {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    # ----- checkpoints --------------------------------------------------------------------------

    def trainer_state(self) -> dict[str, Any]:
        """The contract's trainer_state: everything beyond model and optimizer that resume needs."""
        data = self.train_data
        return {
            "step": self.step, "epoch": getattr(data, "epoch", 0), "tokens_seen": self.tokens_seen,
            "scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "data": data.state_dict() if hasattr(data, "state_dict") else None,
            "rng": capture_rng_state(), "nonfinite_skips": int(self._skips),
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
        self._skips.fill_(int(state.get("nonfinite_skips", 0)))
        self.nonfinite_skips = int(state.get("nonfinite_skips", 0))
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
