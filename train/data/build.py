"""The trainer's data interface, documented in train/data/__init__.py: a config's tokenizer,
its train and eval sources, and their (B, T) int64 batches in the mode cfg.pretokenized picks
(train/data/pretok.py or train/data/stream.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from octo.tokenizer_files import RemoteCodeError, auto_tokenizer
from train.config import DEMO_NAME, OWN_TOKENIZER, TrainConfig
from train.data.demo import ensure_demo_tokenizer
from train.data.hub import hub_unreachable
from train.data.pretok import PretokTrainData, ensure_token_cache, load_part
from train.data.source import DocSource, encode_docs
from train.data.stream import StreamingTrainData
from train.errors import DataError

TrainData = StreamingTrainData | PretokTrainData


# ----- tokenizer --------------------------------------------------------------------------------


def with_own_tokenizer(cfg: TrainConfig) -> TrainConfig:
    """cfg as the train_config.json of a folder that holds a copy of the run's tokenizer records
    it: a local tokenizer folder becomes OWN_TOKENIZER (the config file's own folder, see
    TrainConfig.load), so a copied or moved checkpoint names its own copy and resumes without
    the original folder. Hub names and octo-demo (rebuilt from data_cache_dir) stay."""
    if cfg.tokenizer_name == DEMO_NAME or not is_local_tokenizer(cfg.tokenizer_name):
        return cfg
    return dataclasses.replace(cfg, tokenizer_name=OWN_TOKENIZER)


def is_local_tokenizer(name: str) -> bool:
    """True when tokenizer_name names a local folder (or a path meant as one), not a Hub name."""
    return Path(name).expanduser().exists() or name.startswith(("/", "./", "../", "~"))


def load_tokenizer(name_or_path: str, cache_dir: str | Path = "data_cache"):
    """A fast (Rust-backed) tokenizer with an EOS token, from a Hub name or a local folder.

    "octo-demo" names the demo tokenizer, trained on the demo corpus under cache_dir/demo on
    first use (pass cfg.data_cache_dir). No code from the folder runs (a local folder with an
    auto_map is refused; transformers gets trust_remote_code=False). Any failure is a one-line
    DataError.
    """
    name = name_or_path
    if name == DEMO_NAME:
        name = str(ensure_demo_tokenizer(cache_dir))
    path = Path(name).expanduser()
    local = is_local_tokenizer(name)
    fix = (
        "set tokenizer_name to a Hub name (network needed) or a folder with tokenizer.json "
        "(python -m train.tokenizer trains one)"
    )
    if local and not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise DataError(f"tokenizer folder {name_or_path} {what}; {fix}")
    if not local and (offline := hub_unreachable(f"tokenizer_name {name_or_path!r}")):
        raise DataError(offline)
    try:
        # transformers is imported here, on first use (seconds): run() checks for a stop signal
        # that this import swallowed right after load_tokenizer (train/signals.py).
        tok = auto_tokenizer(path if local else name, local=local)
    except RemoteCodeError as e:
        raise DataError(f"tokenizer_name {name_or_path!r}: {e}") from None
    except Exception as e:
        msg = " ".join(str(e).split())[:300]
        # Not local: only the Hub was tried. Say so, since a mistyped folder name lands here too.
        where = "" if local else ": no local file or folder of that name exists, and the Hub failed"
        raise DataError(
            f"cannot load tokenizer {name_or_path!r}{where} ({type(e).__name__}: {msg}); {fix}"
        ) from None
    if not hasattr(tok, "backend_tokenizer"):
        raise DataError(f"tokenizer {name_or_path!r} has no fast (Rust) version; {fix}")
    if tok.eos_token_id is None:
        raise DataError(
            f"tokenizer {name_or_path!r} has no EOS token, which ends every document; give it "
            "one (eos_token in tokenizer_config.json) or train one with python -m train.tokenizer"
        )
    return tok


# ----- sources of a config ----------------------------------------------------------------------


def _holdout(cfg) -> float:
    if cfg.eval_split is not None and cfg.eval_holdout_fraction > 0:
        raise DataError(
            f"eval_holdout_fraction {cfg.eval_holdout_fraction} holds out train documents only "
            f"when eval_split is null, but eval_split is {cfg.eval_split!r}; set one of them"
        )
    return cfg.eval_holdout_fraction


def _source(cfg, split: str, role: str, **kw: Any) -> DocSource:
    return DocSource(
        cfg.dataset_name, split, cfg.text_column, cache_dir=cfg.data_cache_dir, role=role, **kw
    )


def train_source(cfg) -> DocSource:
    """The train documents of cfg (without the held-out ones); not opened yet."""
    return _source(cfg, cfg.train_split, "train", holdout_fraction=_holdout(cfg), part="kept")


def eval_source(cfg) -> DocSource | None:
    """The eval split, or the held-out part of train, or None (no evaluation)."""
    holdout = _holdout(cfg)
    if cfg.eval_split is not None:
        return _source(cfg, cfg.eval_split, "eval")
    if holdout > 0:
        return _source(cfg, cfg.train_split, "eval", holdout_fraction=holdout, part="heldout")
    return None


def _check_tokenizer(tokenizer) -> None:
    if not hasattr(tokenizer, "backend_tokenizer") or tokenizer.eos_token_id is None:
        raise DataError(
            "the tokenizer must be a fast tokenizer with an EOS token; use load_tokenizer"
        )


# ----- train and eval data ----------------------------------------------------------------------


def build_train_data(
    cfg, tokenizer, rank: int = 0, world_size: int = 1, *, pin_memory: bool = False
) -> TrainData:
    """The training batches of this rank: an iterator of (batch_size, block_size) int64 tensors
    until num_epochs are done, with .epoch, .state_dict(), .load_state_dict(d),
    .tokens_per_epoch() (exact when pre-tokenized, else None) and .batches_per_epoch().
    pin_memory (the run's Runtime.pin_memory): streamed batches in page-locked host memory."""
    _check_tokenizer(tokenizer)
    src = train_source(cfg)
    if cfg.pretokenized:
        folder = ensure_token_cache(src, tokenizer, cfg.data_cache_dir, progress=rank == 0)
        return PretokTrainData(cfg, load_part(folder, "kept"), folder, rank, world_size)
    return StreamingTrainData(cfg, tokenizer, src.open(), rank, world_size, pin_memory=pin_memory)


def first_blocks(src: DocSource, tokenizer, block_size: int, n: int) -> np.ndarray:
    """The first n (or all, if fewer) block_size blocks of src's packed documents: (n, T) int64."""
    chunks, have = [], 0
    for texts in src.iter_texts():
        flat, _ = encode_docs(tokenizer, texts)
        chunks.append(flat)
        have += len(flat)
        if have >= n * block_size:
            break
    flat = np.concatenate(chunks) if chunks else np.empty(0, np.int32)
    n = min(n, len(flat) // block_size)
    return flat[: n * block_size].astype(np.int64).reshape(n, block_size)


def build_eval_batches(cfg, tokenizer, rank: int = 0, world_size: int = 1) -> list[torch.Tensor]:
    """Eval batches of this rank: global batches 0 .. eval_max_batches-1 of the eval documents
    packed in order (no shuffle), rank r taking those with index % world_size == r, the same
    number on every rank (FSDP's forward is a collective; up to world_size - 1 trailing batches
    are left out). Identical in both modes and on every call; empty when there is no eval data
    configured."""
    _check_tokenizer(tokenizer)
    src = eval_source(cfg)
    if src is None:
        return []
    B, T = cfg.batch_size, cfg.block_size
    want = max(cfg.eval_max_batches, world_size) * B  # at least one batch per rank
    if cfg.pretokenized:
        folder = ensure_token_cache(src, tokenizer, cfg.data_cache_dir, progress=rank == 0)
        tokens = load_part(folder, src.part)
        blocks = tokens.blocks(0, min(want, len(tokens) // T), T)
    else:
        blocks = first_blocks(src.open(), tokenizer, T, want)
    if len(blocks) < B * world_size:
        raise DataError(
            f"{src.describe()} has {len(blocks) * T}+ tokens, less than one eval batch per process "
            f"(batch_size x block_size x {world_size} processes = {B * T * world_size}); use a "
            "bigger eval split or holdout fraction"
        )
    n = len(blocks) // B // world_size * world_size
    return [torch.from_numpy(blocks[i * B : (i + 1) * B]) for i in range(rank, n, world_size)]
