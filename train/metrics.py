"""What a person sees: the log line, JSON lines, MFU, memory, and the console/progress output.

MFU = model flops per second / the GPU's dense bf16 peak. Model flops per token (training, forward +
backward) follow PaLM (Chowdhery et al. 2022, appendix B), as nanoGPT does:

    flops/token = 6 * N + 12 * L * T * C

N: parameters that take part in matmuls (all but the input embedding, which is a lookup; a tied
lm_head counts since it multiplies). 6N: 2 flops per multiply-add, forward 1x + backward 2x.
12 * L * T * C: attention scores QK^T and the weighted sum AV, 2 * 2 * T * C flops per token per
layer forward, x3 for forward + backward, at sequence length T = block_size. It counts the full
T x T matrix; a causal kernel skips about half, so this is the usual convention, not the work done.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import torch
from tqdm import tqdm

import octo_kernels
from train.distributed import all_reduce_sum
from train.errors import ConfigError
from train.optim import describe_optimizer, tokens_per_step
from train.trackers import Trackers

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s. Matched in order
# against torch.cuda.get_device_name(): the more specific names first.
GPU_BF16_PEAK_TFLOPS: list[tuple[str, float]] = [
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
]


def peak_tflops(gpu_name: str) -> float | None:
    """Dense bf16 peak (TFLOP/s) of a GPU by its torch.cuda.get_device_name(); None if unknown."""
    return next((tf for key, tf in GPU_BF16_PEAK_TFLOPS if key in gpu_name), None)


def gpu_peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of `device` in FLOP/s, or None (CPU, or a GPU not in the table)."""
    if device.type != "cuda":
        return None
    tflops = peak_tflops(torch.cuda.get_device_name(device))
    return tflops * 1e12 if tflops is not None else None


def matmul_params(model: torch.nn.Module) -> int:
    """N of 6N: parameters of OctoForCausalLM except an untied input embedding (a lookup)."""
    return model.num_parameters(exclude_embeddings=not model.config.tie_word_embeddings)


def flops_per_token(n_matmul_params: int, n_layers: int, seq_len: int, hidden: int) -> float:
    """Training flops per token, forward + backward: 6N + 12 * L * T * C (module docstring)."""
    return 6.0 * n_matmul_params + 12.0 * n_layers * seq_len * hidden


def memory_gib(device: torch.device) -> tuple[float, float] | None:
    """(peak allocated since the last reset, total) in GiB on a GPU; None on CPU. Resets the peak,
    so each log line shows its own interval's peak. Reading these needs no device sync."""
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return peak, total


def _si(x: float) -> str:
    """412345 -> 412k, 1234 -> 1.2k, 3.4e6 -> 3.40M."""
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e4:
        return f"{x / 1e3:.0f}k"
    if x >= 1e3:
        return f"{x / 1e3:.1f}k"
    return f"{x:.0f}"


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def perplexity(loss: float) -> float:
    """exp(loss); inf where that overflows a double (loss above ~709: a run that blew up)."""
    return math.inf if loss >= 709.0 else math.exp(loss)


def _ppl(ppl: float) -> str:
    """3378.45; 1.23e+07 from a million up (a diverged run's 300-digit number would swamp the
    line); inf, nan."""
    return f"{ppl:.2f}" if ppl < 1e6 else f"{ppl:.2e}" if math.isfinite(ppl) else str(ppl)


def format_log_line(r: dict[str, Any]) -> str:
    """`Step 100: loss=8.1234 ppl=3378.45 lr=3.0e-04 grad_norm=1.02 tok/s=412k mfu=38.1%
    mem=4.2GB/80GB` (+ ` skipped=N` when steps were skipped, ` eta=...`): mfu and mem only where
    known (a GPU). GB here are GiB, as nvidia-smi counts."""
    lr = f"lr={r['lr']:.1e}"
    if r.get("muon_lr") is not None:  # optimizer muon: lr= is AdamW's, muon_lr= Muon's
        lr += f" muon_lr={r['muon_lr']:.1e}"
    line = (
        f"Step {r['step']}: loss={r['loss']:.4f} ppl={_ppl(r['ppl'])} {lr} "
        f"grad_norm={r['grad_norm']:.2f} tok/s={_si(r['tokens_per_s'])}"
    )
    if r.get("mfu") is not None:
        line += f" mfu={100 * r['mfu']:.1f}%"
    if r.get("mem_gib") is not None:
        line += f" mem={r['mem_gib']:.1f}GB/{r['mem_total_gib']:.0f}GB"
    if r.get("nonfinite_skips"):
        line += f" skipped={r['nonfinite_skips']}"
    if r.get("eta_s") is not None:
        line += f" eta={_duration(r['eta_s'])}"
    return line


def format_eval_line(r: dict[str, Any]) -> str:
    return f"Eval at step {r['step']}: loss={r['eval_loss']:.4f} ppl={_ppl(r['eval_ppl'])}"


class IntervalMeter:
    """The numbers of one log interval: loss, target tokens, gradient norm and finite steps summed
    on the device (no sync per step), and wall time for tokens/s, MFU and ETA with evaluation and
    checkpoint time left out."""

    def __init__(self, device: torch.device, env: Any, flops_per_token: float) -> None:
        self.device, self.env, self.flops_per_token = device, env, flops_per_token
        self.peak = gpu_peak_flops(device)
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, N, norm, steps
        self.restart(0, 0)

    def restart(self, step: int, tokens_seen: int) -> None:
        self.mark, self.paused_s = (time.perf_counter(), step, tokens_seen), 0.0

    def add(self, good: torch.Tensor, loss_sum: torch.Tensor, n_targets: int, norm: torch.Tensor):
        """One step's contribution, only when it was good (a skipped step's NaN would spread)."""
        zero = torch.zeros((), dtype=torch.float32, device=self.device)
        parts = [torch.where(good, loss_sum, zero), good * n_targets,
                 torch.where(good, norm.float(), zero), good]  # fmt: skip
        self.sums += torch.stack(parts).double()

    def paused(self, fn: Any) -> Any:
        """Run fn() off the clock (evaluation and saving are not training speed)."""
        t = time.perf_counter()
        try:
            return fn()
        finally:
            self.paused_s += time.perf_counter() - t

    def record(self, step: int, tokens_seen: int, total_steps: int) -> dict[str, Any]:
        """The "train" record since the last one: reads the device sums (one sync), resets."""
        sums = self.sums.clone()
        sums[:2] = all_reduce_sum(sums[:2].clone(), self.env)  # norms are global already
        loss_sum, n, norm_sum, good = sums.tolist()
        self.sums.zero_()
        now = time.perf_counter()
        t_last, step_last, tokens_last = self.mark
        dt = max(now - t_last - self.paused_s, 1e-9)
        tps = (tokens_seen - tokens_last) / dt  # all processes
        loss = loss_sum / n if n else float("nan")
        mem = memory_gib(self.device)
        mfu = tps / self.env.world_size * self.flops_per_token / self.peak if self.peak else None
        self.restart(step, tokens_seen)
        return {
            "type": "train", "step": step, "loss": loss, "ppl": perplexity(loss),
            "grad_norm": norm_sum / good if good else float("nan"), "tokens_per_s": tps,
            "mfu": mfu, "mem_gib": mem[0] if mem else None,
            "mem_total_gib": mem[1] if mem else None, "tokens_seen": tokens_seen,
            "eta_s": (total_steps - step) * dt / max(step - step_last, 1),
        }  # fmt: skip


def log_start(t: Any) -> None:
    """A run's first output; t is the Trainer (train/loop.py). The resolved configs beside the
    log, before any line (a full log_dir is one error line), then start_lines and the start
    record."""
    log, c = t.log, t.model.config
    if log.log_path is not None:
        stem = log.log_path.with_name(log.log_path.stem)
        path = Path(f"{stem}_config.json")
        try:
            t.cfg.save(path)
            path = Path(f"{stem}_model.json")
            c.to_json_file(path)
        except OSError as e:
            raise log_dir_error(t.cfg.log_dir, path, e) from None
    for line in start_lines(t):
        log.info(line)
    log.record({"type": "start", "step": t.step, "total_steps": t.total_steps,
                "parameters": t.model.num_parameters(), "precision": t.rt.precision.name,
                "config": t.cfg.to_dict(), "model_config": c.to_dict()})  # fmt: skip


def log_interval(t: Any) -> None:
    """The log line and its JSON record over the steps since the last one (one host sync); t is
    the Trainer."""
    cfg = t.cfg
    r = t.meter.record(t.step, t.tokens_seen, t.total_steps)
    lr = t.schedule(t.step - 1)
    r.update(lr=lr, optimizer=cfg.optimizer, nonfinite_skips=t.nonfinite_skips,
             epoch=getattr(t.train_data, "epoch", 0))  # fmt: skip
    if cfg.optimizer == "muon":  # what each part stepped with (train.optim.set_lr)
        r["lr"] = lr * cfg.muon_adamw_lr_scale
        r["muon_lr"] = lr * cfg.muon_learning_rate / cfg.learning_rate
    t.log.info(format_log_line(r))
    t.log.record(r)


def start_lines(t: Any) -> list[str]:
    """What a run prints first; t is the Trainer (train/loop.py), t.rt its Runtime."""
    cfg, c, rt = t.cfg, t.model.config, t.rt
    dev, env = rt.device, rt.env
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    resuming = f", resuming at step {t.step}" if t.step else ""
    return [
        f"Octo: {t.model.num_parameters() / 1e6:.2f}M parameters ({c.num_hidden_layers} layers, "
        f"hidden {c.hidden_size}, {c.num_attention_heads} heads / {c.num_key_value_heads} KV "
        f"heads, vocab {c.vocab_size})",
        f"Tokens per step: {cfg.batch_size} x {cfg.block_size} x {cfg.gradient_accumulation_steps}"
        f" x {env.world_size} processes = {tokens_per_step(cfg, env.world_size)}",
        f"Global batch: {cfg.batch_size} x {cfg.gradient_accumulation_steps} accumulation x "
        f"{env.world_size} processes = "
        f"{cfg.batch_size * cfg.gradient_accumulation_steps * env.world_size} sequences per step"
        + (f" ({cfg.parallelism.upper()})" if env.enabled else ""),
        f"Planned steps: {t.total_steps} ({t.steps_source}){resuming}",
        f"Device: {dev} ({name}); precision: {rt.precision.describe()}; "
        f"torch.compile: {rt.compile_phrase()}",
        f"Kernels: {octo_kernels.describe(dev)}",
        f"Optimizer: {describe_optimizer(t.optimizer, cfg)}",
        f"Checkpoints: {Path(cfg.checkpoint_dir).resolve()}; logs: {t.log.log_path}",
    ]


class _WarningsToRunLog(logging.Handler):
    """The warnings of the project's modules (logging.getLogger("train.*"): a corrupt checkpoint
    skipped, a changed batch size) as "warning: ..." lines of the run's console and .log file.
    Without it Python prints them bare on stderr and the log file never has them."""

    def __init__(self, run_log: RunLogger) -> None:
        super().__init__(logging.WARNING)
        self.run_log = run_log

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.run_log.info(f"warning: {record.getMessage()}")
        except Exception:  # a closed stream must not turn a warning into the caller's error
            self.handleError(record)


class RunLogger:
    """Console + `{log_dir}/training_YYYYMMDD_HHMMSS.log` (the same lines) + `.jsonl` beside it (one
    JSON object per event: type "start" | "train" | "eval" | "end") + the config's report_to
    trackers (train/trackers.py), fed the same events. On a terminal a tqdm bar with
    ETA runs under the lines; elsewhere (a file, a pipe, CI) only the plain lines. A disabled logger
    (ranks other than 0) writes nothing."""

    def __init__(
        self, log_dir: str | Path, enabled: bool = True, stream: TextIO | None = None
    ) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.bar = None
        self.log_path = self.jsonl_path = None
        self._log = self._jsonl = None  # None once closed, or after a failed write (_write)
        # report_to's trackers, started by the "start" record (enabled loggers only: rank 0)
        self.trackers = Trackers(lambda msg: self.info(f"warning: {msg}"))
        self.last: dict[str, dict[str, Any]] = {}  # the newest record of each type (model card)
        # rank 0 shows the modules' warnings in its log; the other ranks' (the same ones) are
        # dropped rather than printed bare once per process
        self._handler = _WarningsToRunLog(self) if enabled else logging.NullHandler()
        logging.getLogger("train").addHandler(self._handler)
        if not enabled:
            return
        stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
        log_dir = Path(log_dir)
        self.log_path = log_dir / f"training_{stamp}.log"
        self.jsonl_path = self.log_path.with_suffix(".jsonl")
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "a", buffering=1)  # line-buffered; closed in close()
            self._jsonl = open(self.jsonl_path, "a", buffering=1)
        except OSError as e:
            self.close()
            raise log_dir_error(log_dir, Path(e.filename or log_dir), e) from None

    def start_progress(self, total_steps: int, initial_step: int = 0) -> None:
        """The tqdm bar (with ETA), on a terminal only."""
        if self.enabled and getattr(self.stream, "isatty", lambda: False)():
            self.bar = tqdm(total=total_steps, initial=initial_step, unit="step",
                            file=self.stream, dynamic_ncols=True)  # fmt: skip

    def info(self, msg: str) -> None:
        """A line for the person: console (above the bar) and the .log file."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg, file=self.stream)
        else:
            # one write with its newline: torchrun runs Python unbuffered (-u), where print()
            # writes the text and the newline separately and another process's line (the ranks
            # share the pipe) can land between them
            self.stream.write(msg + "\n")
            self.stream.flush()
        self._write("_log", msg + "\n")

    def record(self, event: dict[str, Any]) -> None:
        """One JSON line (the numbers of a log line, an eval, the start or the end)."""
        if self.enabled:
            event = {"time": round(time.time(), 3), **event}
            self._write("_jsonl", json.dumps(event) + "\n")
            self.last[event.get("type")] = event
            self.trackers.record(event)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def _write(self, name: str, text: str) -> None:
        """Write to the .log ("_log") or .jsonl ("_jsonl") file. Why never raise: the log is a
        by-product of training, and a full or failing log_dir hours into a run must not end it
        without a checkpoint. A failed write is one warning on stderr, and neither file is
        written again; training, the console lines and the checkpoints go on."""
        f = getattr(self, name)
        if f is None:
            return
        try:
            f.write(text)
        except OSError as e:
            self._close_files(f.name, e)

    def _close_files(self, failed: str | None = None, error: OSError | None = None) -> None:
        """Close both files (a close flushes, so it can fail too); one warning for the first
        failure, if any."""
        for name in ("_log", "_jsonl"):
            f = getattr(self, name)
            setattr(self, name, None)
            try:
                if f is not None:
                    f.close()
            except OSError as e:
                failed, error = failed or f.name, error or e
        if error is not None:
            print(f"warning: writing the run log {failed} failed ({error.strerror or error}); "
                  "the run's .log and .jsonl are not written from here on (training, the console "
                  "output and checkpoints go on): free space or set log_dir to another disk",
                  file=sys.stderr, flush=True)  # fmt: skip

    def close(self) -> None:
        """Stop routing warnings, close the bar and the files; never raises (see _write)."""
        logging.getLogger("train").removeHandler(self._handler)
        self.trackers.close()
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self._close_files()


def log_dir_error(log_dir: str | Path, path: Path, e: OSError):
    """The ConfigError (one line, exit 2) for a file of the run's log folder that cannot be
    created or written before training starts: nothing is lost by stopping then, and a run that
    would go unlogged from its first step is better fixed than started."""
    return ConfigError(
        f"config key 'log_dir' is {str(log_dir)!r}: writing {path} failed "
        f"({e.strerror or e}); free disk space or set log_dir to a folder you can write to"
    )
