"""Streaming mode: tokenize while training, in DataLoader workers, with exact resume.

Legend: T = block_size, B = batch_size, N = window (shuffle) size in blocks, a multiple of B;
W = max(1, num_workers) streams per rank, S = world_size * W streams in all.

The batch order is a pure function of (data, seed, epoch, position), never of timing:

* Stream s (= rank * W + worker) reads the documents j with (j + epoch) % S == s, in order, so each
  worker tokenizes its own part of the stream (the split rotates every epoch).
* A stream's token sequence is doc + EOS, doc + EOS, ...; it is cut into T-token blocks (no
  padding) and the blocks into windows of N. Window k is permuted with a generator seeded by
  (seed, epoch, s, k) and emitted as N / B batches. The window being emitted and the next one are
  both held: the next fills in step with the emission, so the work per batch stays even. The last
  (short) window of an epoch holds the whole batches left; the final partial batch and block of
  each stream are dropped (< B*T + T tokens per stream and epoch), the same ones with or without
  shuffling. buffer_size 0: N = B, no shuffle.
* With workers, the DataLoader hands out batches round-robin over the streams still running (it
  skips finished ones), in order (in_order=True).

So a position is, per stream, (window k, where window k starts: document and token offset, batches
already emitted from it), plus which stream is next. Every batch travels with its stream's
position after it; TrainData keeps the positions of the batches it has handed out. A resume
re-reads (without tokenizing) the documents before each stream's window, re-tokenizes that one
window, and rotates the workers so the next stream comes first: the next batches are equal to an
uninterrupted run's.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from train.data.cache import tokenizer_identity
from train.data.source import DocSource, encode_docs
from train.errors import DataError
from train.signals import forking_workers, init_worker_signals


def new_stream_state() -> dict[str, Any]:
    return {"window": 0, "doc": 0, "offset": 0, "emitted": 0, "done": False}


class _Packer:
    """Token ids of consecutive documents not yet cut into a window, and where they start:
    the first pending token is token `off` of the stream's document `doc` (EOS counted)."""

    def __init__(self, doc: int, off: int) -> None:
        self.doc, self.off, self.n = doc, off, 0
        self._skip = off  # on resume mid-document: tokens of the first document already used
        self._chunks: list[np.ndarray] = []
        self._lens: deque[int] = deque()  # lengths of the pending documents, the first one whole

    def add(self, flat: np.ndarray, lens: np.ndarray) -> None:
        if self._skip:
            flat, self._skip = flat[self._skip :], 0
        self._chunks.append(flat)
        self._lens.extend(lens.tolist())
        self.n += len(flat)

    def take(self, k: int) -> np.ndarray:
        """Remove and return the first k pending tokens, advancing (doc, off)."""
        buf = np.concatenate(self._chunks) if len(self._chunks) != 1 else self._chunks[0]
        out, rest = buf[:k], buf[k:]
        self._chunks = [rest] if len(rest) else []
        self.n -= k
        while k:
            left = self._lens[0] - self.off
            if k < left:
                self.off, k = self.off + k, 0
            else:
                k -= left
                self._lens.popleft()
                self.doc, self.off = self.doc + 1, 0
        return out


def window_size(buffer_size: int, batch_size: int) -> int:
    """Blocks per shuffle window: buffer_size rounded up to whole batches (B when 0)."""
    return max(1, math.ceil(buffer_size / batch_size)) * batch_size


def batch_size_change_effect(state: dict[str, Any], batch_size: int) -> str | None:
    """What resuming the streamed position `state` (a StreamingTrainData.state_dict()) with
    another batch_size does to the data, for the trainer's one warning line; None when the data
    simply continues (the same batch size, or buffer_size 0: every window is one batch, so no
    stream is inside a window)."""
    was = state.get("batch_size")
    if was is None or was == batch_size or state.get("buffer_size", 0) == 0:
        return None
    return (
        "each data stream restarts its current shuffle window, so up to "
        f"{window_size(state['buffer_size'], was)} blocks per stream are seen again"
    )


# Identity keys older checkpoints do not record: not compared when absent.
_ADDED_LATER = ("text_column", "tokenizer")


def stream_batches(
    src: DocSource,
    tokenizer,
    *,
    block_size: int,
    batch_size: int,
    buffer_size: int,
    seed: int,
    epoch: int,
    stream: int,
    num_streams: int,
    state: dict[str, Any] | None = None,
) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
    """One stream's batches of one epoch: (ids (B, T) int64, the stream's position after it),
    starting from `state` (a position from an earlier batch) or from the epoch's beginning."""
    st = dict(state) if state else new_stream_state()
    if st["done"]:
        return
    T, B = block_size, batch_size
    N = window_size(buffer_size, B)
    texts = src.iter_texts(start=st["doc"], step=num_streams, offset=(stream - epoch) % num_streams)
    packer = _Packer(st["doc"], st["offset"])
    exhausted = False

    def fill(target: int) -> None:
        nonlocal exhausted
        while packer.n < target and not exhausted:
            batch = next(texts, None)
            if batch is None:
                exhausted = True
            else:
                packer.add(*encode_docs(tokenizer, batch))

    def cut() -> tuple[np.ndarray, tuple[int, int]]:
        """The next window: N blocks, or (the last) the whole batches left once the documents
        are exhausted -- cut before shuffling, so a shuffled epoch permutes the same blocks."""
        fill(N * T)
        start = (packer.doc, packer.off)
        n = N if packer.n >= N * T else packer.n // T // B * B
        return packer.take(n * T).reshape(n, T), start

    k, m = st["window"], st["emitted"]
    blocks, _ = cut()
    while True:
        nb = len(blocks) // B
        if nb == 0:
            return
        if buffer_size > 0:
            order = np.random.default_rng([seed % 2**63, epoch, stream, k]).permutation(len(blocks))
        else:
            order = np.arange(len(blocks))
        for i in range(m, nb):
            if i < nb - 1:
                fill(math.ceil((i + 1) * N * T / nb))  # the next window fills in step
                after = {"window": k, "doc": st["doc"], "offset": st["offset"], "emitted": i + 1}
                after["done"] = False
            else:
                nxt, (doc, off) = cut()
                after = {"window": k + 1, "doc": doc, "offset": off, "emitted": 0}
                after["done"] = len(nxt) < B
            ids = torch.from_numpy(blocks[order[i * B : (i + 1) * B]].astype(np.int64))
            yield ids, after
        if after["done"]:
            return
        blocks, k, m = nxt, k + 1, 0
        st = after


class _StreamDataset(torch.utils.data.IterableDataset):
    """The W streams of one rank for one epoch; worker w serves stream (rotation + w) % W.

    Holds copies of what the workers need, not the TrainData (no reference cycle: a dropped
    TrainData shuts its workers down at once, not whenever the cyclic GC runs)."""

    def __init__(self, data: StreamingTrainData) -> None:
        super().__init__()
        c = data.cfg
        self.src, self.tokenizer = data.src, data.tokenizer
        self.kw = dict(
            block_size=c.block_size, batch_size=c.batch_size, buffer_size=c.buffer_size,
            seed=c.seed, epoch=data.epoch, num_streams=data.S,
        )  # fmt: skip
        self.first, self.W = data.rank * data.W, data.W
        self.states, self.rotation = list(data._states), data._next

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        local = (self.rotation + (info.id if info else 0)) % self.W
        for ids, after in stream_batches(
            self.src,
            self.tokenizer,
            stream=self.first + local,
            state=self.states[local],
            **self.kw,
        ):
            yield {"ids": ids, "stream": local, "state": after}


def _worker_init(worker_id: int) -> None:
    # Stop signals are the main process's to act on (train/signals.py): a SIGTERM sent to the
    # whole process group must not kill a worker the main process still reads from.
    init_worker_signals()
    # One tokenizer thread per worker process: the workers are the parallelism.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    torch.set_num_threads(1)


class StreamingTrainData:
    """Iterator of (B, T) int64 token-id batches, tokenized on the fly (see the module docstring).

    Epochs run until cfg.num_epochs, then StopIteration. `state_dict()` is a small JSON dict.
    pin_memory: the DataLoader's batches in page-locked memory (for a CUDA device).
    """

    def __init__(
        self,
        cfg,
        tokenizer,
        src: DocSource,
        rank: int = 0,
        world_size: int = 1,
        *,
        pin_memory: bool = False,
    ) -> None:
        self.cfg, self.tokenizer, self.src = cfg, tokenizer, src
        self.pin_memory = pin_memory
        self.rank, self.world_size = rank, world_size
        self.W = max(1, cfg.num_workers)
        self.S = world_size * self.W
        self.epoch = 0
        self._tokenizer_id: str | None = None  # tokenizer_identity, computed on first use
        self._it: Iterator[dict[str, Any]] | None = None
        self._new_epoch()

    def _new_epoch(self) -> None:
        self._states: list[dict[str, Any] | None] = [None] * self.W
        self._next = 0  # the stream (of this rank's W) that serves the next batch
        self._batches = 0  # batches handed out in this epoch

    def _open(self) -> Iterator[dict[str, Any]]:
        ds = _StreamDataset(self)
        if self.cfg.num_workers == 0:
            return iter(ds)
        loader = torch.utils.data.DataLoader(
            ds,
            batch_size=None,
            num_workers=self.cfg.num_workers,
            worker_init_fn=_worker_init,
            prefetch_factor=4,
            # The workers' base seed comes from this generator, not the global RNG: creating the
            # loader (again, after a resume) must not move torch's RNG (exact resume).
            generator=torch.Generator(),
            pin_memory=self.pin_memory,
            in_order=True,
        )
        with forking_workers():  # the workers start here
            return iter(loader)

    def __iter__(self) -> StreamingTrainData:
        return self

    def __next__(self) -> torch.Tensor:
        while self.epoch < self.cfg.num_epochs:
            if self._it is None:
                self._it = self._open()
            try:
                item = next(self._it, None)
            except DataError as e:  # raised in a worker: keep the one line, drop the traceback
                lines = [ln for ln in str(e).splitlines() if "DataError: " in ln]
                raise DataError(lines[-1].split("DataError: ", 1)[1] if lines else str(e)) from None
            if item is None:
                self._it = None
                if self._batches == 0:
                    raise DataError(
                        f"{self.src.describe()} yields no full batch: each of its {self.S} "
                        f"streams (world_size x num_workers) needs at least batch_size x "
                        f"block_size = {self.cfg.batch_size * self.cfg.block_size} tokens; use "
                        "more data, fewer num_workers, or a smaller batch_size or block_size"
                    )
                self.epoch += 1
                self._new_epoch()
                continue
            local = item["stream"]
            self._states[local] = item["state"]
            self._next = (local + 1) % self.W
            self._batches += 1
            return item["ids"]
        raise StopIteration

    def tokens_per_epoch(self) -> int | None:
        """Unknown without reading the whole stream: None."""
        return None

    def batches_per_epoch(self) -> int | None:
        return None

    def _identity(self) -> dict[str, Any]:
        c = self.cfg
        if self._tokenizer_id is None:
            self._tokenizer_id = tokenizer_identity(self.tokenizer)
        return {
            "dataset": c.dataset_name,
            "split": c.train_split,
            "text_column": c.text_column,
            "tokenizer": self._tokenizer_id,
            "holdout": list(self.src.holdout),
            "num_streams": self.S,
            "batch_size": c.batch_size,
            "block_size": c.block_size,
            "buffer_size": c.buffer_size,
            "seed": c.seed,
        }

    def state_dict(self) -> dict[str, Any]:
        """Where the next batch comes from: epoch, per-stream positions, the next stream."""
        return {
            "mode": "stream",
            **self._identity(),
            "epoch": self.epoch,
            "next": self._next,
            "batches": self._batches,
            "streams": [dict(s) if s else None for s in self._states],
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Continue exactly where the run that saved `d` was; DataError when it cannot."""
        if d.get("mode") != "stream":
            raise DataError(
                f"the checkpoint's data position is for {d.get('mode')!r} mode, this run streams; "
                "set pretokenize back to what the checkpoint's run used"
            )
        streams = [dict(s) if s else None for s in d["streams"]]
        for key, now in self._identity().items():
            was = d.get(key)
            if key == "holdout":
                was = list(was) if was is not None else None
            if key == "batch_size" and was is not None and was != now:
                # The windows are cut anew in batches of the new size from where each stream's
                # current window starts: its blocks already seen come again (at most one window
                # per stream), nothing is skipped. The trainer's resume warning says so (one
                # line: train.checkpoint.resume_warnings, with batch_size_change_effect).
                streams = [s and {**s, "emitted": 0} for s in streams]
                continue
            if was is None and key in _ADDED_LATER:
                continue  # a checkpoint from before the key was recorded
            if key == "tokenizer" and was != now:
                raise DataError(
                    "cannot resume the data position: the checkpoint's run tokenized its stream "
                    f"with another tokenizer (fingerprint {was[:12]}, this run's tokenizer_name "
                    f"{self.cfg.tokenizer_name!r} is {now[:12]}); set tokenizer_name to the one "
                    "that run used (a copy is saved in every checkpoint folder)"
                )
            if was != now:
                hint = " (world_size x num_workers)" if key == "num_streams" else ""
                raise DataError(
                    f"cannot resume the data position exactly: the checkpoint's {key}{hint} was "
                    f"{was!r}, this run's is {now!r}; set it back to {was!r}"
                )
        self._it = None  # stops any running workers
        self.epoch, self._next, self._batches = d["epoch"], d["next"], d["batches"]
        self._states = streams
