"""Checkpoints: atomic saves of everything a run needs to continue bit-exactly, the choice of
which checkpoint to resume from, and the final model folder.

    checkpoints/checkpoint_step_5000/
      config.json, model.safetensors.index.json, model-0000K-of-0000N.safetensors  (save_pretrained:
                                                  the folder loads as a Llama model)
      optimizer.json, optimizer-0000K-of-0000N.safetensors   (optimizer.py: keyed by name)
      trainer_state.json    step, epoch, tokens_seen, scheduler, scaler, data position, RNG states
                            (state.py: each field is checked before a resume)
      train_config.json     the resolved TrainConfig (a local tokenizer named as this folder's copy)
      tokenizer files, generation_config.json   (when a tokenizer is given: octo.tokenizer_files)
      checkpoint_complete.json   written last (octo.integrity.seal): {"format": 2, "step",
                                 "files": {relative path: size in bytes}, "crc32": {relative
                                 path: [CRC-32 of each "crc32_chunk" bytes]}} (format 1, before
                                 checksums: no "crc32"); final/ has one too, with "kind": "model"
    checkpoints/final/      the final model: weights, tokenizer, train_config.json, README.md

Nothing is ever unpickled: tensors are safetensors, everything else JSON.

    folder.py     save_checkpoint, rotation, repair after a crash, save_final_model
    verify.py     verify_checkpoint, the folder names, same_weights
    resume.py     resolve_resume, agree_on_resume, load_checkpoint, resume_warnings, init_from
    state.py      trainer_state.json: RNG capture/restore, the field checks, read/write_json
    optimizer.py  name-keyed optimizer state: group_names, name_keyed, index_keyed, save/load
    dist.py       the same folder from DDP or FSDP2 runs: every rank calls, rank 0 writes
    lock.py       a run owns its checkpoint_dir (a lock file)

Submodules import each other, never this package; it only re-exports.
"""

from train.checkpoint.dist import full_model, rank_state
from train.checkpoint.folder import complete_checkpoints, save_checkpoint, save_final_model
from train.checkpoint.resume import load_checkpoint, resolve_resume, resume_warnings
from train.checkpoint.state import capture_rng_state, restore_rng_state
from train.checkpoint.verify import verify_checkpoint
from train.errors import CheckpointError

__all__ = [
    "CheckpointError",
    "capture_rng_state",
    "complete_checkpoints",
    "full_model",
    "load_checkpoint",
    "rank_state",
    "resolve_resume",
    "restore_rng_state",
    "resume_warnings",
    "save_checkpoint",
    "save_final_model",
    "verify_checkpoint",
]
