"""train/data/: sources and formats, packing, eval batches, holdout, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("datasets")

from train.config import TrainConfig  # noqa: E402
from train.data import (  # noqa: E402
    DataError,
    build_eval_batches,
    build_train_data,
    load_tokenizer,
)
from train.data.bpe import train_tokenizer  # noqa: E402
from train.data.demo import generate_stories  # noqa: E402
from train.data.source import DocSource  # noqa: E402
from train.model_config import resolve_vocab_size  # noqa: E402

DOCS = list(generate_stories(120, seed=7))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A small byte-level BPE (512 tokens) trained on the test stories."""
    return train_tokenizer(DOCS, 512, tmp_path_factory.mktemp("tok"))


def write_jsonl(path: Path, texts, column: str = "text") -> Path:
    path.write_text("".join(json.dumps({column: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def cfg_for(dataset, tmp_path, **kw) -> TrainConfig:
    base = dict(
        dataset_name=str(dataset),
        eval_split=None,
        block_size=16,
        batch_size=4,
        num_workers=0,
        buffer_size=0,
        data_cache_dir=str(tmp_path / "cache"),
        pretokenize=False,  # streamed unless a test asks (null would pre-tokenize: no max_steps)
    )
    return TrainConfig(**{**base, **kw})


def reference_tokens(tok, texts) -> np.ndarray:
    """doc + EOS, doc + EOS, ... through transformers' own tokenizer(...) call."""
    out: list[int] = []
    for t in texts:
        out += tok(t, add_special_tokens=False).input_ids + [tok.eos_token_id]
    return np.array(out)


def texts_of(src: DocSource) -> list[str]:
    return [t for batch in src.iter_texts() for t in batch]


# ----- local formats, all through datasets' streaming path ------------------------------------


def test_jsonl_json_parquet_glob_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = DOCS[:30]
    write_jsonl(tmp_path / "a.jsonl", docs)
    (tmp_path / "b.json").write_text(json.dumps([{"text": t} for t in docs]))
    pq.write_table(
        pa.table({"text": docs + [None, ""], "n": list(range(32))}), tmp_path / "c.parquet"
    )
    parts = tmp_path / "parts"
    parts.mkdir()
    for k in range(3):
        write_jsonl(parts / f"part{k}.jsonl", docs[10 * k : 10 * k + 10])
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", docs[:20])
    write_jsonl(folder / "validation.jsonl", docs[20:])

    for name in ("a.jsonl", "b.json", "c.parquet", "parts/part*.jsonl"):
        src = DocSource(str(tmp_path / name), "train", "text").open()
        assert type(src._ds).__name__ == "IterableDataset"  # the Hub's streaming path
        assert texts_of(src) == docs, name  # None and "" rows are not documents
    assert texts_of(DocSource(str(folder), "train", "text")) == docs[:20]
    assert texts_of(DocSource(str(folder), "validation", "text")) == docs[20:]


def test_txt_documents_are_paragraphs(tmp_path):
    (tmp_path / "t.txt").write_text("First para\nstill first.\n\nSecond.\n\n\nThird\n")
    src = DocSource(str(tmp_path / "t.txt"), "train", "text")
    assert texts_of(src) == ["First para\nstill first.", "Second.", "Third"]


def test_real_text_with_gpt2(shared_data, gpt2_tokenizer_dir, tmp_path):
    tok = load_tokenizer(str(gpt2_tokenizer_dir))
    assert len(tok) == 50257 and tok.eos_token_id == 50256
    path = shared_data / "text" / "tinyshakespeare.txt"
    paras = [p.strip("\n") for p in path.read_text().split("\n\n") if p.strip("\n")]
    cfg = cfg_for(path, tmp_path, block_size=64, batch_size=8)
    data = build_train_data(cfg, tok)
    got = torch.cat([next(data).reshape(-1) for _ in range(6)]).numpy()
    ref = reference_tokens(tok, paras[:200])
    np.testing.assert_array_equal(got, ref[: len(got)])
    assert tok.decode(got[:9].tolist()) == "First Citizen:\nBefore we proceed any further"
    # The TinyStories sample: its literal <|endoftext|> separators are GPT-2's EOS token.
    sample = shared_data / "text" / "tinystories_sample.txt"
    data = build_train_data(cfg_for(sample, tmp_path, block_size=64, batch_size=2), tok)
    ids = torch.cat(list(data)).reshape(-1)
    assert tok.decode(ids[:4].tolist()) == "Once upon a time"
    sample_docs = [p.strip("\n") for p in sample.read_text().split("\n\n") if p.strip("\n")]
    eos = (reference_tokens(tok, sample_docs) == 50256).sum()
    assert eos == len(sample_docs) + sample.read_text().count("<|endoftext|>")
    np.testing.assert_array_equal(ids.numpy(), reference_tokens(tok, sample_docs)[: len(ids)])


# ----- packing ----------------------------------------------------------------------------------


def test_packing_keeps_every_token_once_with_eos(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", DOCS)
    ref = reference_tokens(tok, DOCS)
    assert (ref == tok.eos_token_id).sum() == len(DOCS)
    T, B = 16, 4
    kept = (len(ref) // T) // B * B  # whole batches; the rest of the last ones is dropped
    # In order (no shuffle): the batches are the token stream, cut.
    data = build_train_data(cfg_for(path, tmp_path, block_size=T, batch_size=B), tok)
    got = torch.cat([b.reshape(-1) for b in data]).numpy()
    np.testing.assert_array_equal(got, ref[: kept * T])
    assert len(ref) - len(got) < B * T + T
    # Shuffled, two epochs: each epoch is a permutation of the same blocks, and they differ.
    cfg = cfg_for(path, tmp_path, block_size=T, batch_size=B, buffer_size=24, num_epochs=2)
    data = build_train_data(cfg, tok)
    epochs: list[list[torch.Tensor]] = [[], []]
    for b in data:
        epochs[data.epoch].append(b)
    blocks_ref = sorted(map(tuple, ref[: kept * T].reshape(-1, T).tolist()))
    for ep in epochs:
        assert sorted(map(tuple, torch.cat(ep).tolist())) == blocks_ref
    assert not torch.equal(torch.cat(epochs[0]), torch.cat(epochs[1]))
    assert not torch.equal(torch.cat(epochs[0]).reshape(-1), torch.from_numpy(ref[: kept * T]))


def test_two_workers_split_the_stream(tok, tmp_path):
    """Stream s of S reads documents j with (j + epoch) % S == s; together they cover each
    epoch's documents once."""
    path = write_jsonl(tmp_path / "d.jsonl", DOCS)
    T, B = 16, 4
    cfg = cfg_for(
        path, tmp_path, block_size=T, batch_size=B, num_workers=2, buffer_size=8, num_epochs=2
    )
    data = build_train_data(cfg, tok)
    epochs: list[list[torch.Tensor]] = [[], []]
    for b in data:
        epochs[data.epoch].append(b)
    for epoch, got in enumerate(epochs):
        want = []
        for s in range(2):
            ref = reference_tokens(tok, [d for j, d in enumerate(DOCS) if (j + epoch) % 2 == s])
            n = (len(ref) // T) // B * B
            want += list(map(tuple, ref[: n * T].reshape(-1, T).tolist()))
        assert sorted(map(tuple, torch.cat(got).tolist())) == sorted(want)


# ----- eval batches and holdout ------------------------------------------------------------------


def test_eval_split_batches_deterministic_and_split_over_ranks(tok, tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", DOCS[:60])
    write_jsonl(folder / "validation.jsonl", DOCS[60:])
    cfg = cfg_for(folder, tmp_path, eval_split="validation", eval_max_batches=5)
    ev = build_eval_batches(cfg, tok)
    assert len(ev) == 5 and all(b.shape == (4, 16) and b.dtype == torch.int64 for b in ev)
    ref = reference_tokens(tok, DOCS[60:])
    np.testing.assert_array_equal(torch.cat(ev).reshape(-1).numpy(), ref[: 5 * 64])
    again = build_eval_batches(cfg, tok)
    assert all(torch.equal(a, b) for a, b in zip(ev, again))
    r0, r1 = build_eval_batches(cfg, tok, 0, 2), build_eval_batches(cfg, tok, 1, 2)
    # The same count on every rank (FSDP's eval forward is a collective): the 5th batch is left out.
    assert [len(r0), len(r1)] == [2, 2]
    assert all(torch.equal(a, b) for a, b in zip(ev, [r0[0], r1[0], r0[1], r1[1]]))


def test_holdout_partitions_train(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", DOCS)
    kept = DocSource(str(path), "train", "text", holdout_fraction=0.1)
    held = DocSource(str(path), "train", "text", holdout_fraction=0.1, part="heldout")
    k, h = texts_of(kept), texts_of(held)
    assert len(h) == 12 and len(k) == 108 and sorted(k + h) == sorted(DOCS)
    assert h == [DOCS[i] for i in range(len(DOCS)) if (i + 1) // 10 > i // 10]
    cfg = cfg_for(path, tmp_path, eval_holdout_fraction=0.1, eval_max_batches=3)
    ev = build_eval_batches(cfg, tok)
    np.testing.assert_array_equal(torch.cat(ev).reshape(-1).numpy(), reference_tokens(tok, h)[:192])
    train = torch.cat(list(build_train_data(cfg, tok))).reshape(-1).numpy()
    np.testing.assert_array_equal(train, reference_tokens(tok, k)[: len(train)])
    assert build_eval_batches(cfg_for(path, tmp_path), tok) == []  # no eval configured


# ----- vocabulary -------------------------------------------------------------------------------


def test_resolve_vocab_size(tok, shared_data, gpt2_tokenizer_dir):
    assert len(tok) == 512
    assert resolve_vocab_size(None, tok) == 512
    assert resolve_vocab_size(600, tok) == 600
    gpt2 = load_tokenizer(str(gpt2_tokenizer_dir))
    assert resolve_vocab_size(None, gpt2) == 50304
    with pytest.raises(DataError) as e:
        resolve_vocab_size(16000, gpt2)
    msg = str(e.value)
    assert "\n" not in msg and "16000" in msg and "50257" in msg
    assert "drop vocab_size" in msg and "python -m train.tokenizer" in msg and "50304" in msg


# ----- one clear line for each bad input ---------------------------------------------------------


def one_line_error(fn, *match: str) -> str:
    with pytest.raises(DataError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and all(m in msg for m in match), msg
    return msg


def test_errors_are_one_line(tok, tmp_path):
    docs = write_jsonl(tmp_path / "d.jsonl", DOCS[:5])
    (tmp_path / "empty.jsonl").write_text("")
    write_jsonl(tmp_path / "blank.jsonl", ["", "", ""])
    for missing in ("nothere.jsonl", str(tmp_path / "no" / "*.jsonl"), str(tmp_path / "none.txt")):
        one_line_error(
            lambda m=missing: build_train_data(cfg_for(m, tmp_path), tok), "matches no file"
        )
    for empty in ("empty.jsonl", "blank.jsonl"):
        cfg = cfg_for(tmp_path / empty, tmp_path)
        one_line_error(lambda c=cfg: build_train_data(c, tok), "no non-empty text")
    cfg = cfg_for(docs, tmp_path, text_column="story")
    one_line_error(
        lambda: build_train_data(cfg, tok), "no column 'story'", "text, id", "text_column"
    )
    cfg = cfg_for(docs, tmp_path, eval_split="validation")
    one_line_error(
        lambda: build_eval_batches(cfg, tok), "no split 'validation'", "eval_holdout_fraction"
    )
    cfg = cfg_for(docs, tmp_path, block_size=512, batch_size=64)
    one_line_error(lambda: next(build_train_data(cfg, tok)), "yields no full batch")
    cfg = cfg_for(docs, tmp_path, num_workers=2, block_size=512, batch_size=64)
    one_line_error(lambda: next(build_train_data(cfg, tok)), "yields no full batch")
    cfg = cfg_for(docs, tmp_path, eval_split="validation", eval_holdout_fraction=0.1)
    one_line_error(lambda: build_train_data(cfg, tok), "eval_holdout_fraction", "eval_split")
    # tokenizers: a missing folder, a folder of garbage
    one_line_error(lambda: load_tokenizer(str(tmp_path / "nope")), "does not exist")
    bad = tmp_path / "badtok"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{ not json")
    (bad / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    one_line_error(lambda: load_tokenizer(str(bad)), "cannot load tokenizer")


def test_train_batches_are_long_tensors_of_the_config_shape(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", DOCS)
    data = build_train_data(cfg_for(path, tmp_path, block_size=32, batch_size=3), tok)
    b = next(data)
    assert b.shape == (3, 32) and b.dtype == torch.int64 and data.epoch == 0
    assert data.tokens_per_epoch() is None
    assert int(b.max()) < len(tok)


def test_unreachable_hub_name_says_no_local_folder_either(tok, tmp_path, monkeypatch):
    """A relative path without ./ reads as a Hub name ("mydata/stories"): when the Hub cannot
    serve it, the line says that no local file or folder of that name exists either."""
    import datasets
    from huggingface_hub import constants

    import train.data.hub

    def offline(name, **kw):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    # the Hub answers (train.data.hub's probe passes, as when online) but cannot serve the name
    monkeypatch.setattr(train.data.hub, "_reachable", constants.ENDPOINT)
    msg = one_line_error(
        lambda: build_train_data(cfg_for("mydata/stories", tmp_path), tok),
        "no local file or folder 'mydata/stories' exists",
        "ConnectionError",
        "start with ./",
    )
    assert "Couldn't reach" in msg


def test_unreadable_lines_name_the_file_and_line(tok, tmp_path, capfd):
    """A line that is not JSON, or a .txt byte that is not UTF-8, is one DataError naming the file
    and its line: found when the source opens (the first file) or later (a second file), while
    streaming in the main process or in DataLoader workers, or while pre-tokenizing (which
    leaves no cache folder). `datasets` names neither the file nor the line itself."""
    (tmp_path / "bad.txt").write_bytes(b"one story\n\ntwo \xff stories\n")
    one_line_error(
        lambda: build_train_data(cfg_for(tmp_path / "bad.txt", tmp_path), tok),
        "bad.txt line 3: byte 0xff is not UTF-8",
        "fix or remove that line",
    )
    parts = tmp_path / "parts"
    parts.mkdir()
    write_jsonl(parts / "a.jsonl", DOCS * 9)  # more than open()'s first read of 1024 rows
    (parts / "b.jsonl").write_text(json.dumps({"text": DOCS[0]}) + "\n{not json\n")
    one_line_error(
        lambda: build_train_data(cfg_for(parts / "b.jsonl", tmp_path), tok),
        "b.jsonl line 2: not JSON",
    )
    for kw in ({"num_workers": 0}, {"num_workers": 2}, {"pretokenize": True}):
        cfg = cfg_for(parts / "*.jsonl", tmp_path, **kw)
        data = build_train_data(cfg, tok) if not kw.get("pretokenize") else None  # a.jsonl opens
        one_line_error(
            lambda c=cfg, d=data: list(d if d is not None else build_train_data(c, tok)),
            "b.jsonl line 2: not JSON (Expecting property name",
        )
    assert [p.name for p in (tmp_path / "cache" / "pretok").iterdir() if p.is_dir()] == []
    assert "Failed to load JSON" not in capfd.readouterr().err  # datasets' own log line
