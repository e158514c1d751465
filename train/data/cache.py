"""Folders under data_cache_dir that are built once and then only read, and what keys them.

    build_once(final, build)  -> final       build(tmp) fills a temporary sibling; COMPLETE last
    cache_key(obj)            -> "3f9c..."   16 hex digits of sha256(json(obj, sorted keys))
    tokenizer_identity(tok)   -> "a1b2..."   64 hex digits: what a tokenizer's ids depend on

Built this way: the demo corpus and tokenizer (train/data/demo.py, keyed on the generator's
version) and the pre-tokenized caches (train/data/pretok.py, keyed on the documents and the
tokenizer). A folder without its COMPLETE marker is never read, so a crash or a full disk in the
middle of a build costs only the rebuild. tokenizer_identity is the one fingerprint of a
tokenizer: part of the pre-tokenized cache's key, and recorded in every streamed data position
(train/data/stream.py), which a resume compares.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from octo.files import fsync_tree, staged_folder, write_durable
from train.errors import DataError, write_error_fix
from train.locks import wait_lock

COMPLETE = "COMPLETE"  # marker file: a cache folder without it is never used


def cache_key(obj: Any) -> str:
    """16 hex digits of the sha256 of obj as sorted-key JSON: a folder-name key."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def tokenizer_identity(tokenizer) -> str:
    """sha256 of what the token ids depend on: the backend tokenizer's serialisation (vocabulary,
    merges, normalizer, pre-tokenizer, added tokens) and the EOS id, without the parts that do
    not change ids or that differ between copies of one tokenizer: truncation and padding (set
    per call; encode_docs switches them off) and the merges' spelling (["a", "b"] since
    tokenizers 0.20, "a b" before). So the same tokenizer loaded from its folder, the Hub cache or
    a checkpoint's copy gives the same string; its name or folder is no part of it. Streamed data
    positions store this string: its value for a given tokenizer must never change, or a resume
    of an earlier run would refuse its own tokenizer."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
    model = spec.get("model") or {}
    if isinstance(model.get("merges"), list):
        model["merges"] = [m.split(" ", 1) if isinstance(m, str) else m for m in model["merges"]]
    spec["eos_token_id"] = tokenizer.eos_token_id
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def build_once(final: Path, build: Callable[[Path], None]) -> Path:
    """Return `final`, first building it when no complete copy exists.

    build(tmp) fills a temporary sibling folder; its files are fsynced, a COMPLETE marker is
    written last, and the folder is renamed into place, so a crash leaves either nothing or a
    temporary folder that is never read. A lock file serialises concurrent builders (DDP ranks
    on one machine): the first builds, the others wait and then find it complete. A failed
    write (a full disk, a file-size limit, a folder that cannot be written) is a one-line
    DataError naming the fix; the temporary folder is removed.
    """
    final = Path(final)
    if (final / COMPLETE).is_file():
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        with wait_lock(final.parent / f"{final.name}.lock"):
            if (final / COMPLETE).is_file():
                return final
            for stale in final.parent.glob(f"{final.name}.tmp-*"):  # a killed builder's leftovers
                shutil.rmtree(stale, ignore_errors=True)
            if final.exists():  # present without its marker: half-written, never used
                shutil.rmtree(final)
            tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=final.parent))
            with staged_folder(final, tmp=tmp):  # renamed into place whole, or removed
                build(tmp)
                fsync_tree(tmp)
                write_durable(tmp / COMPLETE, "complete\n")
    except OSError as e:
        fix = write_error_fix(e, "data_cache_dir")
        where = f" ({e.filename})" if e.filename else ""
        raise DataError(f"building {final} failed: {e.strerror or e}{where}; {fix}") from e
    return final
