"""A whole run from a validated config: tokenizer, data, Trainer, resume, fit, and its ending (the
final model folder and a generated sample, or the line to resume). `python -m train` calls run().

Exit codes: 0 done (also after SIGINT/SIGTERM, with a checkpoint); 1 the run failed (non-finite
losses, CUDA out of memory); 2 a problem with the config, the data, the tokenizer or a checkpoint,
reported in one line; 130 stopped at once by Ctrl-C (a second one during training, or one before
training or after the last checkpoint; SIGTERM there too), with one line saying what was saved.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import socket
import sys
from pathlib import Path
from typing import Any

import torch

from train.checkpoint.dist import full_model
from train.checkpoint.folder import complete_checkpoints, save_final_model
from train.checkpoint.lock import own_run_folders
from train.checkpoint.resume import (
    agree_on_resume,
    check_fresh_checkpoint_dir,
    check_tokenizer_fits,
    load_init_model,
)
from train.config import DEMO_NAME, ConfigError, TrainConfig
from train.data import build_eval_batches, build_train_data, load_tokenizer
from train.distributed import all_gather_object, cleanup, init_distributed
from train.errors import CheckpointError, DataError, write_error_fix
from train.loop import Trainer
from train.model_card import FinalModel
from train.model_config import ModelSpec, run_config
from train.resume_end import check_resume_step
from train.runtime import Runtime, check_memory, resolve_device
from train.signals import raise_if_interrupted, stop_signals_interrupt
from train.trackers import check_installed

N_SAMPLES = 3  # continuations of sample_prompt printed at the end of a run
OOM_HINT = (
    "CUDA out of memory{where}: lower batch_size (raising gradient_accumulation_steps keeps the "
    "tokens per step), set use_gradient_checkpointing=true, or lower block_size"
)


def run(cfg: TrainConfig, model_fields: dict[str, Any]) -> int:
    """Train as cfg says (model_fields: train.model_config.load_model_config). Returns the exit
    code. The run's log is closed and the process group left on every way out.

    SIGINT and SIGTERM outside fit() (which installs its own handlers: finish the step, save)
    raise KeyboardInterrupt: at start-up, during the final model's save or sampling, the run
    ends with one line naming what is saved, and save_final_model removes its partial folder.
    (python -m train's main() installed the same handlers before its imports.)"""
    with stop_signals_interrupt():
        return _run(cfg, model_fields)


def _run(cfg: TrainConfig, model_fields: dict[str, Any]) -> int:
    trainer = env = final = locks = None
    cwd = Path.cwd()  # the directory the run's relative paths mean (see resume_command)
    try:
        try:
            cfg, spec = run_config(cfg, model_fields)  # what every saved config records
            try:  # a missing tracker library: one line now, not after the data is built
                check_installed(cfg.report_to)
            except ValueError as e:
                raise ConfigError(str(e)) from None
            check_writable_folders(cfg)
            device = resolve_device(cfg)
            env = init_distributed(device)
            rt = Runtime.build(cfg, device=device, env=env)  # every other start-up decision
            # this run's alone from here (train/checkpoint/lock.py), before any of it is read
            locks = own_run_folders(cfg.checkpoint_dir, cfg.resume_from, env)
            if not cfg.resume_from:
                check_fresh_checkpoint_dir(cfg.checkpoint_dir)
            # a bad resume_from is reported before any data is built
            resume = agree_on_resume(cfg.resume_from, env) if cfg.resume_from else None
            trainer = build_trainer(cfg, spec, rt)
            log = trainer.log  # before the resume: its warnings become lines of this log
            if spec.init_from is not None:
                log.info(f"Initialized from {spec.init_from}: its weights, with a new optimizer, "
                         "learning-rate schedule and data order")  # fmt: skip
            if resume is not None:
                trainer.resume(resume)
                locks.release_source()
                if check_resume_step(trainer, resume, cfg, env) == "complete":
                    return 0
            raise_if_interrupted()  # one that an import swallowed ("Exception ignored in ...")
            result = trainer.fit()
        except (ConfigError, DataError, CheckpointError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except torch.cuda.OutOfMemoryError:
            step = f" at step {trainer.step}" if trainer is not None else ""
            print("error: " + OOM_HINT.format(where=step), file=sys.stderr)
            return 1
        if result.status == "interrupted":
            if env.is_main:  # the other ranks log nothing and have no checkpoint path
                log.info(f"Stopped by {result.signal} at step {result.step}; checkpoint saved to "
                         f"{result.checkpoint}. Resume with: "
                         f"{resume_command(result.checkpoint, env, cwd)}")  # fmt: skip
            return 0
        if result.status == "nonfinite":
            return 1
        model = full_model(trainer.model, env, rt.device)  # FSDP: gathered on rank 0
        if env.is_main:
            try:
                final = save_final_model(final_model(trainer, model, cfg, rt))
            except CheckpointError as e:  # a full disk at the very end: the checkpoints stand
                print(f"error: {e}", file=sys.stderr)
                return 2
            log.info(f"Final model: {final} (loads with OctoForCausalLM.from_pretrained and as "
                     "Llama in transformers)")  # fmt: skip
            if trainer.tokenizer is not None:
                sample = generate_sample(model, trainer.tokenizer, cfg, rt)
                log.info(f"Samples from {final}:\n{sample}")
        return 0
    except KeyboardInterrupt:  # Ctrl-C (or SIGTERM outside fit), or the trainer's second one
        if env is None or env.is_main:
            line = interrupted_line(trainer, env, cwd, final, cfg)
            print(line, file=sys.stderr, flush=True)
        return 130
    finally:
        if trainer is not None:
            trainer.log.close()
        if locks is not None:
            locks.release()
        if env is not None:
            cleanup(env)


def final_model(trainer: Trainer, model: Any, cfg: TrainConfig, rt: Runtime) -> FinalModel:
    """What the final folder and its card record of the trained run: `model` is the trainer's
    model as a plain module (full_model), the rest the trainer's counts and log."""
    log = trainer.log
    return FinalModel(
        cfg, model, trainer.tokenizer, step=trainer.step, tokens_seen=trainer.tokens_seen,
        world_size=rt.env.world_size, device=rt.device, precision=rt.precision, last=log.last,
        jsonl_path=log.jsonl_path,
    )  # fmt: skip


def interrupted_line(
    trainer: Trainer | None, env: Any, cwd: Path, final: Path | None, cfg: TrainConfig
) -> str:
    """What a run stopped at once by Ctrl-C leaves: nothing, or its newest complete checkpoint
    (and the command that resumes from it). A Ctrl-C during a save's last steps (older
    checkpoints being removed) may come after the new checkpoint stood complete: it is named. A
    resumed run stopped before it trained still has the checkpoint it resumes from."""
    resume_from = cfg.resume_from
    again = (f"; nothing new was saved: run the same command again to resume from {resume_from}"
             if resume_from else "")  # fmt: skip
    if trainer is None:
        return "interrupted before training started" + (again or "; nothing was saved")
    line = f"interrupted at step {trainer.step}"
    saved = dict(complete_checkpoints(Path(cfg.checkpoint_dir)))
    ckpt = saved.get(trainer.step, trainer.last_checkpoint)
    if final is not None:  # while sampling: the run is complete
        return f"{line} while sampling; the final model {final} and checkpoint {ckpt} are saved"
    if ckpt is None:
        return line + (again or "; nothing was saved (no checkpoint yet)")
    return (f"{line}; the last complete checkpoint is {ckpt}. Resume with: "
            f"{resume_command(ckpt, env, cwd)}")  # fmt: skip


def resume_command(checkpoint: Path, env: Any, cwd: str | Path | None = None) -> str:
    """The command that continues this run from `checkpoint`, verbatim from any directory:
    `cd <the run's working directory> && python -m train --config <checkpoint>/train_config.json
    --set resume_from=<checkpoint>`. Its train_config.json is the run's resolved config (every
    key, --model-config and --set included; the model as a preset name or its fields, so an
    edited model file does not change it), with resume_from pointed at the checkpoint.

    Why `cd` and not absolute paths: besides the checkpoint path, that config may hold relative
    paths (checkpoint_dir, log_dir, data_cache_dir, a local dataset_name or tokenizer_name), and
    whether dataset_name or tokenizer_name is a local path or a Hub name is the data loader's
    rule (what exists relative to the working directory). Run from the directory the run
    started in, every one of them means what it meant, the saved config stays as the person
    wrote it, and this function needs no copy of that rule. cwd: that directory (run() passes
    the one it started in; default: the current one)."""
    cwd = shlex.quote(str(cwd if cwd is not None else Path.cwd()))
    config = shlex.quote(str(Path(checkpoint) / "train_config.json"))
    launch = "python -m train"
    if env.group:  # as many processes again (a changed world size resumes with a warning)
        per_node = os.environ.get("LOCAL_WORLD_SIZE", str(env.world_size))
        launch = f"torchrun --nproc_per_node={per_node} -m train"
        if per_node != str(env.world_size):
            launch = "torchrun (with this run's node options) -m train"
    resume = shlex.quote(f"resume_from={checkpoint}")
    return f"cd {cwd} && {launch} --config {config} --set {resume}"


def check_writable_folders(cfg: TrainConfig) -> None:
    """Create checkpoint_dir, log_dir and (when used) data_cache_dir and write and remove a small
    file in each, so a folder that cannot be written is one line (ConfigError, exit 2) before any
    data is read, not a traceback at the first log line or at the first checkpoint save, hours
    in. Every rank checks (under torchrun on several machines each sees its own disks); the file
    name holds the host and process id, so ranks sharing a folder never touch the same file."""
    keys = ["checkpoint_dir", "log_dir"]
    # data_cache_dir only when used and not yet a folder: a read-only folder of complete caches
    # is fine, and a cache that must be built there reports a failed write itself (build_once)
    used = cfg.pretokenized or DEMO_NAME in (cfg.dataset_name, cfg.tokenizer_name)
    if used and not Path(cfg.data_cache_dir).is_dir():
        keys.append("data_cache_dir")
    for key in keys:
        folder = Path(getattr(cfg, key))
        probe = folder / f".write-test-{socket.gethostname()}-{os.getpid()}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"octo\n")
            probe.unlink()
        except OSError as e:
            with contextlib.suppress(OSError):
                probe.unlink()
            reason = e.strerror or str(e)
            if isinstance(e, FileExistsError):  # mkdir(exist_ok=True) on a file
                reason = "a file of that name exists"
            elif e.filename and Path(e.filename) not in (folder, probe):  # a parent folder
                reason += f": {e.filename}"
            fix = write_error_fix(e, key, too_big=f"set {key} to a larger disk")
            raise ConfigError(
                f"config key {key!r} is {str(folder)!r}, which cannot be written ({reason}); {fix}"
            ) from None


def build_trainer(cfg: TrainConfig, spec: ModelSpec, rt: Runtime) -> Trainer:
    """Tokenizer, model shape (vocab sized to the tokenizer), data, then the Trainer on rt; with
    spec.init_from (a model folder; spec.fields are its config.json's), its weights, loaded
    before the tokenizer and data, so a bad folder is reported first."""
    init_from, env = spec.init_from, rt.env

    model = load_init_model(init_from) if init_from is not None else None
    tokenizer = load_tokenizer(cfg.tokenizer_name, cache_dir=cfg.data_cache_dir)
    raise_if_interrupted()  # one that transformers' import swallowed: before any data is built
    if model is not None:
        check_tokenizer_fits(init_from, tokenizer, model.config.vocab_size)
    model_cfg = spec.resolve(tokenizer)
    # Whether it fits, before any data or module is built; every rank agrees (each checks its
    # own device), so no rank goes on to wait for one that stopped.
    try:
        samples = (N_SAMPLES, len(sample_prompt_ids(tokenizer, cfg.sample_prompt)))
        check_memory(cfg, model_cfg, rt, samples)
        error = None
    except ConfigError as e:
        error = str(e)
    error = next((e for e in all_gather_object(error, env) if e is not None), None)
    if error is not None:
        raise ConfigError(error)
    # A separate eval split is built first (it is small): a missing split or column is reported
    # before the train split is pre-tokenized (minutes to hours). A holdout is read from the
    # train split's cache, which the train build makes.
    if cfg.eval_split is not None:
        eval_data = build_eval_batches(cfg, tokenizer, env.rank, env.world_size)
    train_data = build_train_data(
        cfg, tokenizer, env.rank, env.world_size, pin_memory=rt.pin_memory
    )
    if cfg.eval_split is None:
        eval_data = build_eval_batches(cfg, tokenizer, env.rank, env.world_size)
    return Trainer(cfg, model_cfg, runtime=rt, train_data=train_data, eval_data=eval_data,
                   tokenizer=tokenizer, model=model)  # fmt: skip


def sample_prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The prompt's token ids; an empty one starts from BOS (or EOS)."""
    return tokenizer.encode(prompt) or [tokenizer.bos_token_id or tokenizer.eos_token_id or 0]


def generate_sample(
    model: Any, tok: Any, cfg: TrainConfig, rt: Runtime, n_samples: int = N_SAMPLES
) -> str:
    """n_samples continuations of cfg.sample_prompt by the trained model (top-k 50, top-p 0.95,
    temperature 0.8), one batch, from a generator seeded with cfg.seed, so the same weights print
    the same samples; on rt.device, in rt.precision."""
    prompt = sample_prompt_ids(tok, cfg.sample_prompt)
    ids = torch.tensor([prompt] * n_samples, dtype=torch.long, device=rt.device)  # (n, T0)
    gen = torch.Generator(rt.device).manual_seed(cfg.seed)
    with rt.precision.autocast():
        out = model.generate(
            ids, max_new_tokens=cfg.sample_max_new_tokens, temperature=0.8, top_k=50,
            top_p=0.95, eos_token_id=tok.eos_token_id, generator=gen,
        )  # fmt: skip
    texts = [tok.decode(row.tolist(), skip_special_tokens=True).strip() for row in out]
    return "\n\n".join(f"[{i + 1}] {t}" for i, t in enumerate(texts))
