"""Where documents come from, and how a document becomes token ids.

A `DocSource` is the ordered sequence of non-empty texts of one split of a dataset, numbered
0, 1, 2, ... It is opened through `datasets` with `streaming=True` for every kind of source, so the
path that streams a Hugging Face Hub dataset is the same one the tests drive with local files:

    dataset_name               what is read                          documents
    "org/name" (Hub)           the Hub dataset, streamed             rows of text_column
    file.txt                   split "train"                         paragraphs (blank-line split)
    file.jsonl / .json         split "train"                         rows of text_column
    file.parquet               split "train"                         rows of text_column
    "dir/*.jsonl" (a glob)     split "train" (files in sorted order) as for the files' kind
    folder/                    splits from file names (train*, validation*/valid*/dev*, test*)
    "octo-demo"                the generated demo corpus (train/data/demo.py), built on first use

Held-out evaluation (eval_split null, eval_holdout_fraction = p/q > 0): train document i is held
out iff floor((i+1)p/q) > floor(ip/q), i.e. exactly floor(n p/q) of the first n documents, spread
evenly, independent of the seed. part="kept" reads the rest, part="heldout" the held-out ones.

`datasets` is imported lazily (only when a source is opened): the model, kernels, benchmarks and a
run from an existing pre-tokenized cache work without it.
"""

from __future__ import annotations

import glob as globlib
import json
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from train.config import DEMO_NAME
from train.data.demo import DEMO_VERSION, ensure_demo_corpus
from train.data.hub import hub_unreachable
from train.errors import DataError

BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def is_local(name: str) -> bool:
    """True when dataset_name names a local file, folder or glob rather than a Hub dataset."""
    if any(c in name for c in "*?[") or Path(name).expanduser().exists():
        return True
    return name.startswith(("/", "./", "../", "~")) or Path(name).suffix in BUILDERS


def local_files(name: str) -> tuple[str, list[Path]]:
    """(builder, sorted files) of a local file / glob / folder; DataError when there are none."""
    p = Path(name).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in BUILDERS)
        if not files:
            raise DataError(
                f"dataset folder {p} holds no {'/'.join(BUILDERS)} files; "
                "point dataset_name at a folder, file or glob of them"
            )
    elif p.is_file():
        files = [p]
    else:
        files = sorted(Path(f) for f in globlib.glob(str(p), recursive=True) if Path(f).is_file())
        if not files:
            what = "glob" if any(c in name for c in "*?[") else "file"
            raise DataError(
                f"dataset {what} {name!r} matches no file; fix dataset_name (a Hub name, or a "
                "local .txt/.jsonl/.json/.parquet file, glob or folder)"
            )
    kinds = sorted({BUILDERS.get(f.suffix, f.suffix) for f in files})
    if len(kinds) != 1 or kinds[0] not in BUILDERS.values():
        raise DataError(
            f"dataset {name!r} mixes or holds unsupported file kinds ({', '.join(kinds)}); use one "
            "kind of .txt, .jsonl/.json or .parquet files"
        )
    return kinds[0], files


class DocSource:
    """The non-empty texts of `split` of `name`, in order (optionally only part of a holdout).

    Opening (the `datasets` call, the split and column checks) happens on first use, in the
    process that uses it; a DocSource can be handed to forked DataLoader workers once opened.
    """

    def __init__(
        self,
        name: str,
        split: str,
        column: str,
        *,
        holdout_fraction: float = 0.0,
        part: str = "kept",
        cache_dir: str | Path = "data_cache",
        role: str = "train",
    ) -> None:
        if part not in ("kept", "heldout"):
            raise ValueError(f"part must be 'kept' or 'heldout', got {part!r}")
        self.name, self.split, self.column, self.part, self.role = name, split, column, part, role
        self.cache_dir = Path(cache_dir)
        f = Fraction(holdout_fraction).limit_denominator(1_000_000)
        self.holdout = (f.numerator, f.denominator)  # p/q, exact integer arithmetic
        self._ds = None  # datasets.IterableDataset of the split, after open()
        self._strip_newlines = False
        self._files: list[Path] = []  # the local files read, for locating a read error

    # ----- identity (needs no `datasets`) ------------------------------------------------------

    def fingerprint(self) -> dict[str, Any]:
        """What the documents depend on: for local files every file's size and mtime, so an
        edited file changes the fingerprint (and the pre-tokenized cache key)."""
        fp: dict[str, Any] = {"split": self.split, "column": self.column, "holdout": self.holdout}
        if self.name == DEMO_NAME:
            fp["dataset"] = {"demo": DEMO_VERSION}
        elif is_local(self.name):
            _, files = local_files(self.name)
            fp["dataset"] = [
                [str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files
            ]
        else:
            fp["dataset"] = {"hub": self.name}
        return fp

    # ----- opening ------------------------------------------------------------------------------

    def open(self) -> DocSource:
        """Load the split lazily through `datasets` and check that split and column exist."""
        if self._ds is not None:
            return self
        try:  # absent on the GPU image, where a run reads a complete pre-tokenized cache
            import datasets  # lazy: see above (and seconds to import)
        except ImportError:
            raise DataError(
                "reading a dataset needs the `datasets` package (pip install datasets), or a "
                "complete pre-tokenized cache (python -m train.prepare on a machine that has it)"
            ) from None
        # CRITICAL: a read failure is reported as one DataError line; datasets would log it too
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)
        name = self.name
        if name == DEMO_NAME:
            name = str(ensure_demo_corpus(self.cache_dir))
        try:
            if is_local(name):
                builder, files = local_files(name)
                self._files = files
                kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
                self._strip_newlines = builder == "text"
                p = Path(name).expanduser()
                if p.is_dir():
                    dd = datasets.load_dataset(builder, data_dir=str(p), streaming=True, **kwargs)
                else:
                    files_s = [str(f) for f in files]
                    dd = datasets.load_dataset(
                        builder, data_files={"train": files_s}, streaming=True, **kwargs
                    )
            else:
                if offline := hub_unreachable(f"dataset_name {name!r}"):
                    raise DataError(offline)
                dd = datasets.load_dataset(name, streaming=True)
        except DataError:
            raise
        except StopIteration:  # datasets' json builder, on files with no rows
            raise DataError(self._empty_message()) from None
        except Exception as e:  # network, unknown Hub name, unreadable file: one line
            msg = " ".join(str(e).split())[:300]
            hub = "" if is_local(name) else f"no local file or folder {name!r} exists, and "
            raise DataError(
                f"cannot open dataset {self.name!r}: {hub}{type(e).__name__}: {msg}; use a Hub "
                "name that exists (network needed) or a local .txt/.jsonl/.json/.parquet file or "
                "folder (a relative path may start with ./)"
            ) from None
        if self.split not in dd:
            have = ", ".join(dd) or "none"
            if self.role == "eval":
                fix = (
                    "set eval_split to one of those, or set eval_split to null and "
                    "eval_holdout_fraction to e.g. 0.01 to hold out 1% of the train documents"
                )
            else:
                fix = "set train_split to one of those"
            raise DataError(
                f"dataset {self.name!r} has no split {self.split!r} (it has: {have}); {fix}"
            )
        ds = dd[self.split]
        columns = ds.column_names
        if columns is None:  # some streaming builders know their columns only after a first row
            first = next(self._guarded(ds.take(1)), None)
            columns = list(first) if first is not None else [self.column]
        if self.column not in columns:
            raise DataError(
                f"dataset {self.name!r} split {self.split!r} has no column {self.column!r} "
                f"(columns: {', '.join(columns)}); set text_column to one of them"
            )
        self._ds = ds.select_columns([self.column])
        if next(self.iter_texts(batch_docs=1), None) is None:
            raise DataError(self._empty_message())
        return self

    def _empty_message(self) -> str:
        return (
            f"{self.describe()} has no non-empty text in column {self.column!r}; point "
            "dataset_name at data that has some"
        )

    # ----- reading ------------------------------------------------------------------------------

    def _iter_docs(self) -> Iterator[tuple[bool, str]]:
        """(held out?, text) of every non-empty document of the split, in order."""
        self.open()
        p, q = self.holdout
        i = 0  # numbers the non-empty documents of the split
        for rows in self._guarded(self._ds.iter(batch_size=1024)):
            for text in rows[self.column]:
                if text is None:
                    continue
                if not isinstance(text, str):
                    raise DataError(
                        f"dataset {self.name!r} column {self.column!r} holds "
                        f"{type(text).__name__}, not text; set text_column to a text column"
                    )
                if self._strip_newlines:
                    text = text.strip("\n")
                if text:
                    yield p > 0 and ((i + 1) * p) // q > (i * p) // q, text
                    i += 1

    def _guarded(self, rows: Iterable[Any]) -> Iterator[Any]:
        """rows, with a failure while reading them (a malformed JSON line, a byte that is not
        UTF-8, a dropped connection) raised as one DataError naming the file and line where known
        and the fix. In a DataLoader worker too: the main process keeps the DataError's line."""
        it = iter(rows)
        while True:
            try:
                item = next(it)
            except StopIteration:
                return
            except DataError:
                raise
            except Exception as e:
                raise DataError(self._read_error(e)) from None
            yield item

    def _read_error(self, e: Exception) -> str:
        where = _find_bad_line(self._files)
        if where is not None:
            fix = "fix or remove that line (.jsonl: one JSON object per line; .txt: UTF-8 text)"
        else:
            where = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            fix = (
                "check the files dataset_name names (.jsonl: one JSON object per line; .txt: "
                "UTF-8 text)"
                if self._files
                else "check the network and the dataset name, then run again"
            )
        return f"cannot read {self.describe()}: {where}; {fix}"

    def iter_texts(
        self, start: int = 0, step: int = 1, offset: int = 0, batch_docs: int = 256
    ) -> Iterator[list[str]]:
        """Lists of at most batch_docs texts: documents j = offset + k*step for k >= start, in
        order (j numbers the non-empty documents of this part). Skipped documents are read but
        never tokenized, so seeking to `start` costs a read of the text before it."""
        heldout = self.part == "heldout"
        j, want = 0, offset + start * step
        batch: list[str] = []
        for held, text in self._iter_docs():
            if held != heldout:
                continue
            if j == want:
                batch.append(text)
                want += step
                if len(batch) == batch_docs:
                    yield batch
                    batch = []
            j += 1
        if batch:
            yield batch

    def iter_parts(self, batch_docs: int = 1024) -> Iterator[tuple[list[str], list[str]]]:
        """(kept texts, held-out texts) of consecutive runs of batch_docs documents: both parts
        in one pass (what the pre-tokenized cache stores)."""
        kept: list[str] = []
        held_out: list[str] = []
        for held, text in self._iter_docs():
            (held_out if held else kept).append(text)
            if len(kept) + len(held_out) == batch_docs:
                yield kept, held_out
                kept, held_out = [], []
        if kept or held_out:
            yield kept, held_out

    def describe(self) -> str:
        """A short human name for messages: dataset, split, part."""
        part = (
            ""
            if self.holdout[0] == 0
            else f" ({self.part} part of a {self.holdout[0]}/{self.holdout[1]} holdout)"
        )
        return f"dataset {self.name!r} split {self.split!r}{part}"


def _find_bad_line(files: list[Path]) -> str | None:
    """'FILE line N: what is wrong' for the first line of `files` that is not UTF-8 or, in a
    JSON-lines file, not JSON; None when none is found (the failure was elsewhere). Called only
    after a read failed (`datasets` names neither the file nor the line: pyarrow's "row" counts
    from the start of a chunk), so reading the files again costs nothing on the way that works."""
    for f in files:
        if f.suffix not in (".txt", ".json", ".jsonl"):
            continue
        try:
            with open(f, "rb") as fh:
                whole = f.suffix == ".json" and fh.read(4096).lstrip()[:1] == b"["  # a JSON array
                fh.seek(0)
                chunks = [fh.read()] if whole else fh  # the array is parsed whole, lines alone
                for n, raw in enumerate(chunks, 1):
                    try:
                        text = raw.decode("utf-8")
                        if f.suffix != ".txt" and text.strip():
                            json.loads(text)
                    except UnicodeDecodeError as e:
                        line = n + raw.count(b"\n", 0, e.start)
                        return f"{f} line {line}: byte {raw[e.start]:#04x} is not UTF-8"
                    except json.JSONDecodeError as e:
                        return f"{f} line {n + e.lineno - 1}: not JSON ({e.msg}, column {e.colno})"
        except OSError as e:
            return f"{f}: {e.strerror or e}"
    return None


# ----- token ids --------------------------------------------------------------------------------


def encode_docs(tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize texts with EOS after each: (flat (sum(lens),) int32 ids, lens (n,) int64).

    Calls the tokenizer's Rust backend directly (the ids equal `tokenizer(text,
    add_special_tokens=False).input_ids`, without the Python-side dict building), with truncation
    and padding switched off so no document is ever cut.
    """
    backend = tokenizer.backend_tokenizer
    if backend.truncation is not None:
        backend.no_truncation()
    if backend.padding is not None:
        backend.no_padding()
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    eos = tokenizer.eos_token_id
    flat: list[int] = []
    lens = np.empty(len(texts), dtype=np.int64)
    for k, enc in enumerate(encode(texts, add_special_tokens=False)):
        ids = enc.ids
        flat += ids
        flat.append(eos)
        lens[k] = len(ids) + 1
    return np.array(flat, dtype=np.int32), lens
