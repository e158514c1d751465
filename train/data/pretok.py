"""Pre-tokenized mode: tokenize a split once, on all cores, into memory-mapped token shards.

Cache layout (one folder per key, under data_cache_dir/pretok/):

    {name}-{split}-{key}/      key = sha256 of (format version, dataset fingerprint -- for local
      meta.json                files their sizes and mtimes --, split, text column, holdout,
      kept-00000.bin ...       tokenizer identity (train/data/cache.py), `tokenizers` version)
      heldout-00000.bin ...    (only with a holdout: the held-out documents, for evaluation)
      COMPLETE                 written last; the folder is built under a temporary name and renamed

Each part is the concatenation doc + EOS, doc + EOS, ... of its documents in order, as raw uint16
(uint32 when the vocabulary exceeds 65536 ids) split into shards of SHARD_TOKENS; a block may span
two shards. Training reads blocks straight from the memory maps in the training process: block b
is tokens [b*T, (b+1)*T); epoch e visits the blocks in the order of a permutation seeded by
(seed, e) (in order when buffer_size is 0); global batch g is blocks [g*B*world, (g+1)*B*world) of
that order, rank r taking the r-th B of them. A position is (epoch, blocks consumed), exact for
any num_workers and also meaningful when the world size changes.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
import torch
from tqdm import tqdm

from train.data.cache import build_once, cache_key, tokenizer_identity
from train.data.forkpool import ForkPool, WorkerDied
from train.data.source import DocSource, encode_docs
from train.errors import DataError

CACHE_VERSION = 2  # 2: the tokenizer keyed by tokenizer_identity (1: its raw serialisation)
SHARD_TOKENS = 1 << 27  # 256 MiB of uint16 per shard


def token_dtype(vocab: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else uint32."""
    return np.dtype(np.uint16) if vocab <= 1 << 16 else np.dtype(np.uint32)


def _key_fields(src: DocSource, tokenizer) -> dict[str, Any]:
    """What the cached ids depend on (meta.json records it too). No tokenizer name or folder: a
    run resumed from a checkpoint reads the checkpoint's copy of its tokenizer, and the same ids
    must find the same cache."""
    return {
        "version": CACHE_VERSION,
        "source": src.fingerprint(),
        "tokenizer": tokenizer_identity(tokenizer),
        "tokenizers": tokenizers.__version__,
    }


def cache_path(src: DocSource, tokenizer, root: str | Path) -> Path:
    """Where the cache of src's split lives (computing it needs no `datasets`)."""
    key = cache_key(_key_fields(src, tokenizer))
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(src.name.rstrip("/*")).name or "data")[-40:]
    return Path(root) / "pretok" / f"{slug}-{src.split}-{key}"


class _ShardWriter:
    """Appends token arrays to {part}-NNNNN.bin files of at most shard_tokens tokens each."""

    def __init__(self, folder: Path, part: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.folder, self.part, self.dtype, self.cap = folder, part, dtype, shard_tokens
        self.shards: list[list[Any]] = []  # [file name, tokens]
        self._f = None
        self.docs = 0

    def write(self, ids: np.ndarray, docs: int) -> None:
        self.docs += docs
        while len(ids):
            if self._f is None or self.shards[-1][1] == self.cap:
                if self._f is not None:
                    self._f.close()
                name = f"{self.part}-{len(self.shards):05d}.bin"
                self._f = open(self.folder / name, "wb")
                self.shards.append([name, 0])
            n = min(len(ids), self.cap - self.shards[-1][1])
            self._f.write(ids[:n].astype(self.dtype, copy=False).tobytes())
            self.shards[-1][1] += n
            ids = ids[n:]

    def close(self) -> dict[str, Any]:
        if self._f is not None:
            self._f.close()
        return {"shards": self.shards, "tokens": sum(n for _, n in self.shards), "docs": self.docs}


_TOKENIZER = None  # the tokenizer of the pool's forked workers


def _pool_init() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    torch.set_num_threads(1)


def _encode_parts(parts: tuple[list[str], list[str]]) -> tuple[np.ndarray, np.ndarray]:
    return tuple(
        encode_docs(_TOKENIZER, texts)[0] if texts else np.empty(0, np.int32) for texts in parts
    )


def build_token_cache(
    src: DocSource,
    tokenizer,
    out: Path,
    *,
    shard_tokens: int = SHARD_TOKENS,
    processes: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize every document of src's split into `out` (kept and held-out parts); returns meta.

    The reading process hands batches of documents to a pool of `processes` (default: every core)
    forked tokenizer processes (train/data/forkpool.py), at most 2 per process in flight, and
    writes the results in order. The workers leave stop signals to this process; a finished pool
    is closed and joined, one stopped by an error or an interrupt is terminated, and a worker
    that dies (the out-of-memory killer) fails the build with a DataError instead of hanging it.
    """
    global _TOKENIZER
    src.open()
    vocab = len(tokenizer)
    dtype = token_dtype(vocab)
    writers = {p: _ShardWriter(out, p, dtype, shard_tokens) for p in ("kept", "heldout")}
    bar = tqdm(
        desc=f"tokenizing {src.describe()}",
        unit=" docs",
        unit_scale=True,
        disable=not progress,
        file=sys.stderr,
        mininterval=1.0,
    )
    processes = processes or os.cpu_count() or 1
    _TOKENIZER = tokenizer
    pool = None
    tokens = 0

    def write(batch: tuple[list[str], list[str]], ids: tuple[np.ndarray, np.ndarray]) -> None:
        nonlocal tokens
        for part, texts, arr in zip(("kept", "heldout"), batch, ids):
            writers[part].write(arr, len(texts))
            tokens += len(arr)
        bar.update(len(batch[0]) + len(batch[1]))
        bar.set_postfix_str(f"{tokens / 1e6:.1f}M tokens", refresh=False)

    try:
        if processes > 1:
            pool = ForkPool(processes, _pool_init)  # forks here: the workers see _TOKENIZER
        inflight: deque = deque()
        for batch in src.iter_parts():
            if pool is None:
                write(batch, _encode_parts(batch))
                continue
            inflight.append((batch, pool.submit(_encode_parts, batch)))
            if len(inflight) >= 2 * processes:
                b, r = inflight.popleft()
                write(b, pool.result(r))
        while inflight:
            b, r = inflight.popleft()
            write(b, pool.result(r))
        if pool is not None:
            pool.close()  # every result is in: the workers exit when the queue runs dry
    except WorkerDied as e:
        pool.terminate()
        raise DataError(
            f"pre-tokenizing {src.describe()} failed: a tokenizer process was lost ({e}; most "
            f"likely the out-of-memory killer); pre-tokenize with fewer processes (python -m "
            f"train.prepare --config CONFIG --processes {max(1, processes // 2)}) or with more "
            "free memory"
        ) from None
    except BaseException:
        if pool is not None:
            pool.terminate()  # ends the workers (a SIGTERM from their parent) and joins them
        raise
    finally:
        _TOKENIZER = None
        bar.close()
    meta = {
        **_key_fields(src, tokenizer),
        "dtype": dtype.name,
        "vocab": vocab,
        "eos": tokenizer.eos_token_id,
        "parts": {p: w.close() for p, w in writers.items()},
    }
    if meta["parts"]["kept"]["tokens"] == 0:
        raise DataError(f"{src.describe()} has no documents to tokenize; use more data")
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


class Tokens:
    """One part of a cache as a virtual 1-D token array over its memory-mapped shards."""

    def __init__(self, folder: Path, part: dict[str, Any], dtype: str) -> None:
        self.arrays = [
            np.memmap(folder / name, dtype=dtype, mode="r", shape=(n,))
            for name, n in part["shards"]
        ]
        self.ends = np.cumsum([len(a) for a in self.arrays], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def read(self, start: int, out: np.ndarray) -> None:
        """Copy tokens [start, start + len(out)) into out (any integer dtype)."""
        i = int(np.searchsorted(self.ends, start, side="right"))
        done = 0
        while done < len(out):
            lo = start + done - (int(self.ends[i - 1]) if i else 0)
            n = min(len(out) - done, len(self.arrays[i]) - lo)
            out[done : done + n] = self.arrays[i][lo : lo + n]
            done += n
            i += 1

    def blocks(self, first: int, n: int, block_size: int) -> np.ndarray:
        """Blocks first .. first+n-1 in order: (n, T) int64."""
        out = np.empty((n, block_size), dtype=np.int64)
        self.read(first * block_size, out.reshape(-1))
        return out


def ensure_token_cache(
    src: DocSource, tokenizer, root: str | Path, *, progress: bool = True, **build_kw: Any
) -> Path:
    """The complete cache folder of src's split, built first when missing (or stale: any change
    of dataset, split, column, holdout or tokenizer gives another key)."""
    return build_once(
        cache_path(src, tokenizer, root),
        lambda tmp: build_token_cache(src, tokenizer, tmp, progress=progress, **build_kw),
    )


def load_part(folder: Path, part: str) -> Tokens:
    meta = json.loads((folder / "meta.json").read_text())
    return Tokens(folder, meta["parts"][part], meta["dtype"])


class PretokTrainData:
    """Iterator of (B, T) int64 batches read from a token cache (see the module docstring)."""

    def __init__(
        self, cfg, tokens: Tokens, folder: Path, rank: int = 0, world_size: int = 1
    ) -> None:
        self.cfg, self.tokens, self.folder = cfg, tokens, folder
        self.rank, self.world_size = rank, world_size
        self.nblocks = len(tokens) // cfg.block_size
        self.step = cfg.batch_size * world_size  # blocks per global batch
        if self.nblocks < self.step:
            raise DataError(
                f"the pre-tokenized data ({len(tokens)} tokens in {folder}) is smaller than one "
                f"global batch (batch_size x world_size x block_size = "
                f"{self.step * cfg.block_size} tokens); use more data or a smaller batch"
            )
        self.epoch, self.position = 0, 0  # position: blocks of this epoch's order consumed
        self._order: tuple[int, np.ndarray | None] | None = None

    def _epoch_order(self) -> np.ndarray | None:
        if self.cfg.buffer_size == 0:
            return None
        if self._order is None or self._order[0] != self.epoch:
            rng = np.random.default_rng([self.cfg.seed % 2**63, self.epoch])
            self._order = (self.epoch, rng.permutation(self.nblocks))
        return self._order[1]

    def __iter__(self) -> PretokTrainData:
        return self

    def __next__(self) -> torch.Tensor:
        B, T = self.cfg.batch_size, self.cfg.block_size
        if self.position + self.step > self.nblocks:
            self.epoch, self.position = self.epoch + 1, 0
        if self.epoch >= self.cfg.num_epochs:
            raise StopIteration
        first = self.position + self.rank * B
        order = self._epoch_order()
        if order is None:
            out = self.tokens.blocks(first, B, T)
        else:
            out = np.empty((B, T), dtype=np.int64)
            for r, b in enumerate(order[first : first + B].tolist()):
                self.tokens.read(b * T, out[r])
        self.position += self.step
        return torch.from_numpy(out)

    def batches_per_epoch(self) -> int:
        """Batches this rank yields per epoch (the same on every rank)."""
        return self.nblocks // self.step

    def tokens_per_epoch(self) -> int:
        """Tokens this rank yields per epoch, exactly."""
        return self.batches_per_epoch() * self.cfg.batch_size * self.cfg.block_size

    def state_dict(self) -> dict[str, Any]:
        return {
            "mode": "pretok",
            "tokens": len(self.tokens),
            "block_size": self.cfg.block_size,
            "buffer_size_zero": self.cfg.buffer_size == 0,
            "seed": self.cfg.seed,
            "epoch": self.epoch,
            "position": self.position,
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if d.get("mode") != "pretok":
            raise DataError(
                f"the checkpoint's data position is for {d.get('mode')!r} mode, this run reads a "
                "pre-tokenized cache; set pretokenize back to what the checkpoint's run used"
            )
        now = self.state_dict()
        for key, what in (
            ("tokens", "pre-tokenized data (dataset, split or tokenizer)"),
            ("block_size", "block_size"),
            ("buffer_size_zero", "shuffling (buffer_size 0 or not)"),
            ("seed", "seed"),
        ):
            if d.get(key) != now[key]:
                raise DataError(
                    f"cannot resume the data position exactly: the checkpoint's {what} differs "
                    f"({key} {d.get(key)!r}, now {now[key]!r}); set it back"
                )
        self.epoch, self.position = d["epoch"], d["position"]
