"""Tokenizer folders as transformers reads them: never running their code, and saved so that
other tools (transformers 4.45 and later, llama.cpp's converter) read what Octo trained with.

Remote code: a tokenizer_config.json or config.json with an `auto_map` names Python files of the
folder for transformers to import (with trust_remote_code, or after a y at its prompt). Octo
never runs code from a tokenizer or model folder: `check_no_remote_code` refuses such a folder
before transformers sees it, every transformers call passes trust_remote_code=False (an error,
where None would ask), and `save_tokenizer` writes neither an auto_map nor a code file.

Saving: transformers 5 writes tokenizer_class "TokenizersBackend", which 4.x cannot load, and a
model_max_length of ~1e30 unless the tokenizer knew one. `save_tokenizer` names a class both
read and records the model's context.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REMOTE_CODE_JSON = ("tokenizer_config.json", "config.json")
CODE_SUFFIXES = (".py", ".pyc", ".so")
# transformers 5's generic fast-tokenizer class; 4.x knows the same class as this name
PORTABLE_CLASS = "PreTrainedTokenizerFast"
GENERIC_CLASSES = ("TokenizersBackend", PORTABLE_CLASS)
# keys transformers 5 writes that say where a tokenizer was loaded from, not what it is
LOAD_KEYS = ("backend", "is_local", "local_files_only", "auto_map")


def check_no_remote_code(directory: str | Path) -> None:
    """ValueError naming the file and the key when `directory`'s tokenizer_config.json or
    config.json has an `auto_map`. A file that does not parse is left to its reader's message."""
    for name in REMOTE_CODE_JSON:
        path = Path(directory) / name
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(d, dict) and "auto_map" in d:
            raise ValueError(
                f"{path} has an 'auto_map' key, which names Python code in that folder for "
                "transformers to run; Octo never runs code from a tokenizer or model folder: "
                "remove the key or use another tokenizer"
            )


def special_token_ids(tokenizer: Any) -> dict[str, int]:
    """{bos_token_id, eos_token_id, pad_token_id} of the tokenizer, those it has; for a model's
    config.json and generation_config.json."""
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    return {k: v for k, v in ids.items() if v is not None}


def save_tokenizer(tokenizer: Any, directory: str | Path, model_max_length: int | None) -> None:
    """tokenizer.save_pretrained(directory), made portable: tokenizer_class is one that
    transformers 4.45+ and 5 both load (the generic backend class becomes PreTrainedTokenizerFast;
    a model's own class such as GPT2Tokenizer stays, 4.x loads its fast twin), model_max_length is
    the model's context (max_position_embeddings; None: a tokenizer saved without a model keeps
    its own), and nothing that names code is kept: no auto_map, no .py file (transformers copies
    a remote-code tokenizer's module beside it).
    OSError on a failed write, as save_pretrained raises it."""
    directory = Path(directory)
    before = {p.name for p in directory.iterdir()} if directory.is_dir() else set()
    tokenizer.save_pretrained(str(directory))
    for p in directory.iterdir():
        if p.name not in before and p.suffix in CODE_SUFFIXES:
            p.unlink()
    path = directory / "tokenizer_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    for key in LOAD_KEYS:
        cfg.pop(key, None)
    if cfg.get("tokenizer_class") in (None, *GENERIC_CLASSES):
        cfg["tokenizer_class"] = PORTABLE_CLASS
    if model_max_length is not None:
        cfg["model_max_length"] = model_max_length
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
