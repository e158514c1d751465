"""Where a resumed run stands against its planned last step: train on, already complete, or past
its end (a ConfigError). train.run.run() asks right after the resume."""

from __future__ import annotations

from pathlib import Path

from train.checkpoint.verify import same_weights
from train.config import ConfigError, TrainConfig
from train.distributed import DistEnv, broadcast_object
from train.loop import Trainer


def check_resume_step(trainer: Trainer, resume: Path, cfg: TrainConfig, env: DistEnv) -> str | None:
    """Where the resumed step stands against the run's planned last step. Before it: None (train
    on). At it, with checkpoint_dir/final holding this checkpoint's weights: the run is complete,
    which is one line and "complete" (run() exits 0: no evaluation, save or samples again). At
    it without that final model (a run stopped during its final save): None, and the run saves
    its final model and samples. Past it (max_steps or num_epochs lowered): one ConfigError line
    (exit 2), since going on would only save that checkpoint's weights again as this run's final
    model, which is surely not what the change meant."""
    step, total = trainer.step, trainer.total_steps
    fix = f"raise max_steps above {step}"
    if trainer.steps_source != "max_steps":
        fix = f"raise num_epochs or set max_steps above {step}"
    if step < total:
        return None
    if step == total:
        final = Path(cfg.checkpoint_dir) / "final"
        done = broadcast_object(same_weights(final, resume) if env.is_main else None, env)
        if not done:
            return None
        trainer.log.info(f"{resume} is at step {step}, this run's last ({trainer.steps_source}), "
                         f"and {final} holds its weights: the run is complete; {fix} to train "
                         "on")  # fmt: skip
        return "complete"
    raise ConfigError(
        f"resume_from {resume} is at step {step}, past this run's last step {total} "
        f"({trainer.steps_source}); {fix} to train on from it"
    )
