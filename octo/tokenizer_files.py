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

Loading: `auto_tokenizer` is the one AutoTokenizer.from_pretrained call (the guard above, then
trust_remote_code=False; a local folder is read with local_files_only=True).
`load_local_tokenizer` is what the CLIs (octo.generate, octo.export_gguf) load a folder's
tokenizer with: the folder's completion marker (octo/integrity.py) and its JSON files are
checked first, so a damaged file is named, not reported as whatever transformers raises.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from octo.integrity import read_marker, verify_marked

REMOTE_CODE_JSON = ("tokenizer_config.json", "config.json")
CODE_SUFFIXES = (".py", ".pyc", ".so")
# transformers 5's generic fast-tokenizer class; 4.x knows the same class as this name
PORTABLE_CLASS = "PreTrainedTokenizerFast"
GENERIC_CLASSES = ("TokenizersBackend", PORTABLE_CLASS)
# keys transformers 5 writes that say where a tokenizer was loaded from, not what it is
LOAD_KEYS = ("backend", "is_local", "local_files_only", "auto_map")

# a folder holds a tokenizer when it has one of these
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
# the JSON files AutoTokenizer may read (config.json: for the tokenizer class when
# tokenizer_config.json does not name one); a checkpoint's other JSON files are not its business
TOKENIZER_JSON = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "config.json",
)
# the files a tokenizer's vocabulary is read from: tokenizer.json (fast), or a slow tokenizer's
VOCAB_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model", "spiece.model")
# every file a tokenizer folder may hold that the loader reads: checked against a completion
# marker when the folder has one (octo/integrity.py)
TOKENIZER_NAMES = frozenset(
    TOKENIZER_FILES + TOKENIZER_JSON + VOCAB_FILES + ("merges.txt", "chat_template.jinja")
)


class RemoteCodeError(ValueError):
    """A tokenizer or model folder whose JSON names Python code for transformers to run."""


def check_no_remote_code(directory: str | Path) -> None:
    """RemoteCodeError (a ValueError) naming the file and the key when `directory`'s
    tokenizer_config.json or config.json has an `auto_map`. A file that does not parse is left to
    its reader's message."""
    for name in REMOTE_CODE_JSON:
        path = Path(directory) / name
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(d, dict) and "auto_map" in d:
            raise RemoteCodeError(
                f"{path} has an 'auto_map' key, which names Python code in that folder for "
                "transformers to run; Octo never runs code from a tokenizer or model folder: "
                "remove the key or use another tokenizer"
            )


def auto_tokenizer(name_or_path: str | Path, *, local: bool) -> Any:
    """AutoTokenizer.from_pretrained(name_or_path), never running code: a local folder is checked
    by check_no_remote_code first (RemoteCodeError) and read with local_files_only=True; a Hub
    name is fetched (or read from the Hub cache) by transformers. trust_remote_code=False always.
    Anything else transformers raises is raised as it is: the callers word it for their users."""
    from transformers import AutoTokenizer  # lazy: seconds to import; the model API never needs it

    if local:
        check_no_remote_code(name_or_path)
    return AutoTokenizer.from_pretrained(
        str(name_or_path), local_files_only=local, trust_remote_code=False
    )


def load_local_tokenizer(directory: str | Path, hint: str = "") -> Any:
    """The tokenizer of a local folder, never from the Hub, never running the folder's code
    (auto_tokenizer); ValueError (with `hint` appended) when the folder holds no tokenizer or
    one that does not load. transformers raises whatever its readers raise (JSONDecodeError
    without a file name, OSError, KeyError, ...), so the folder's completion marker (when it has
    one) is checked for the tokenizer's files, a missing vocabulary is named, its JSON files are
    parsed first to name a broken one, and any other failure is reported with the folder."""
    directory = Path(directory)
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(
            f"no tokenizer in {directory} (none of {', '.join(TOKENIZER_FILES)}){hint}"
        )
    try:  # a checkpoint or final folder has a completion marker: its files are checked
        marker = read_marker(directory)
        if marker is not None:
            verify_marked(directory, [n for n in marker["files"] if n in TOKENIZER_NAMES])
    except ValueError as e:
        raise ValueError(f"{e}; restore the folder{hint}") from None
    if not any((directory / name).is_file() for name in VOCAB_FILES):
        # transformers would try to convert a slow tokenizer and ask for sentencepiece or
        # tiktoken, or build a tokenizer of one token
        raise ValueError(
            f"{directory / 'tokenizer.json'} is missing: {directory} has a tokenizer config but "
            f"no vocabulary ({', '.join(VOCAB_FILES)}); copy the tokenizer's files back{hint}"
        )
    for path in [directory / name for name in TOKENIZER_JSON if (directory / name).is_file()]:
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ValueError(
                f"{path} does not read as JSON ({e}); restore or re-save it{hint}"
            ) from None
    try:
        return auto_tokenizer(directory, local=True)
    except RemoteCodeError:
        raise
    except Exception as e:  # a third-party loader: whatever it raises means a bad folder
        raise ValueError(
            f"the tokenizer in {directory} does not load ({type(e).__name__}: {e}); its files are "
            f"damaged or not a transformers tokenizer: re-save it{hint}"
        ) from None


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
