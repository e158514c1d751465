"""init_from: a fresh run that starts from trained weights (fine-tuning, or more pre-training on
other data), what transformers' `model_name_or_path` is to its Trainer.

The folder is a final model folder, a complete checkpoint_step_N folder or a transformers Llama
folder (config.json + safetensors). Only its weights are taken, through the one weight loader
(octo.hf_io.from_pretrained, which never unpickles); the model's shape is its config.json's
(train.config.load_model_config reads it before any data is loaded). The optimizer, the
learning-rate schedule, the step count and the data order start fresh from the config, unlike
resume_from, which continues a run exactly. The configs the run saves name the model by its fields
and set init_from to null, so resuming the new run (resume_from) needs nothing else.
"""

from __future__ import annotations

import re
from pathlib import Path

from octo import OctoForCausalLM
from train.checkpoint import CheckpointError, verify_checkpoint
from train.data import DataError

_CHECKPOINT = re.compile(r"checkpoint_step_\d+(\.tmp|\.old)?")


def load_init_model(folder: str | Path) -> OctoForCausalLM:
    """The model of `folder`, fp32 on the CPU (the trainer moves it). A checkpoint folder must be
    complete and intact (verify_checkpoint: an interrupted save's is refused); any problem with
    the weights is one CheckpointError naming the folder."""
    folder = Path(folder)
    if _CHECKPOINT.fullmatch(folder.name) or (folder / "trainer_state.json").is_file():
        try:
            verify_checkpoint(folder)
        except CheckpointError as e:
            raise CheckpointError(f"init_from: {e}") from None
    try:
        return OctoForCausalLM.from_pretrained(folder)
    except (ValueError, OSError) as e:
        raise CheckpointError(f"init_from {folder}: {e}") from None


def check_tokenizer_fits(folder: str | Path, tokenizer, vocab_size: int) -> None:
    """DataError (one line) when the tokenizer has ids the model's embedding has no row for."""
    n = len(tokenizer)
    if n > vocab_size:
        name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        raise DataError(
            f"tokenizer {name!r} has {n} tokens but init_from {folder}'s model has vocab_size "
            f"{vocab_size}; set tokenizer_name to the tokenizer the model was trained with (a "
            "final or checkpoint folder holds it: tokenizer_name=<that folder>)"
        )
