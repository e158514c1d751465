"""Pre-tokenized mode: the cache key, atomic build, dtype, and reading what streaming reads."""

from __future__ import annotations

import json
import sys
from collections import Counter

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
    train_source,
)
from train.data.bpe import train_tokenizer  # noqa: E402
from train.data.cache import COMPLETE  # noqa: E402
from train.data.demo import generate_stories  # noqa: E402
from train.data.pretok import cache_path, ensure_token_cache, load_part, token_dtype  # noqa: E402
from train.data.source import DocSource  # noqa: E402

DOCS = list(generate_stories(80, seed=5))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(DOCS, 450, tmp_path_factory.mktemp("tok"))


def write(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def reference_tokens(tok, texts) -> np.ndarray:
    out: list[int] = []
    for t in texts:
        out += tok(t, add_special_tokens=False).input_ids + [tok.eos_token_id]
    return np.array(out)


def make_cfg(path, tmp_path, **kw) -> TrainConfig:
    base = dict(
        dataset_name=str(path),
        eval_split=None,
        block_size=16,
        batch_size=4,
        num_workers=0,
        buffer_size=100,
        pretokenize=True,
        data_cache_dir=str(tmp_path / "cache"),
    )
    return TrainConfig(**{**base, **kw})


def cache_tokens(cfg, tok, part="kept") -> np.ndarray:
    tokens = load_part(cache_path(train_source(cfg), tok, cfg.data_cache_dir), part)
    out = np.empty(len(tokens), np.int64)
    tokens.read(0, out)
    return out


def test_cache_holds_the_corpus_and_reads_like_streaming(tok, tmp_path):
    path = write(tmp_path / "d.jsonl", DOCS)
    cfg = make_cfg(path, tmp_path, eval_holdout_fraction=0.2, eval_max_batches=4, num_epochs=2)
    data = build_train_data(cfg, tok)
    kept = [d for i, d in enumerate(DOCS) if (i + 1) // 5 == i // 5]
    held = [d for i, d in enumerate(DOCS) if (i + 1) // 5 > i // 5]
    np.testing.assert_array_equal(cache_tokens(cfg, tok), reference_tokens(tok, kept))
    np.testing.assert_array_equal(cache_tokens(cfg, tok, "heldout"), reference_tokens(tok, held))
    # One epoch: a permutation of every whole block, exactly tokens_per_epoch tokens.
    epoch = [next(data) for _ in range(data.batches_per_epoch())]
    assert data.tokens_per_epoch() == sum(b.numel() for b in epoch)
    ref = reference_tokens(tok, kept)
    blocks = [tuple(b) for b in ref[: len(ref) // 16 * 16].reshape(-1, 16).tolist()]
    got = [tuple(b) for b in torch.cat(epoch).tolist()]
    assert not Counter(got) - Counter(blocks) and len(blocks) - len(got) < 4  # at most B-1 left
    assert got != blocks[: len(got)]  # shuffled
    # The next epoch: the blocks again, in another order (each epoch has its own permutation, and
    # drops its own last < B blocks).
    again = [tuple(b) for b in torch.cat([next(data) for _ in range(len(epoch))]).tolist()]
    assert data.epoch == 1 and not Counter(again) - Counter(blocks) and again != got
    # Without shuffling, the same batches as streaming; eval batches are the same in both modes.
    plain = dict(buffer_size=0, eval_holdout_fraction=0.2, eval_max_batches=4)
    seq = list(build_train_data(make_cfg(path, tmp_path, **plain), tok))
    stream = list(build_train_data(make_cfg(path, tmp_path, pretokenize=False, **plain), tok))
    assert len(seq) == len(stream) and all(torch.equal(a, b) for a, b in zip(seq, stream))
    ev = build_eval_batches(cfg, tok)
    ev_stream = build_eval_batches(make_cfg(path, tmp_path, pretokenize=False, **plain), tok)
    assert len(ev) == 4 and all(torch.equal(a, b) for a, b in zip(ev, ev_stream))


def test_cache_rebuilt_when_tokenizer_or_file_changes(tok, tmp_path):
    path = write(tmp_path / "d.jsonl", DOCS[:40])
    cfg = make_cfg(path, tmp_path)
    first = cache_path(train_source(cfg), tok, cfg.data_cache_dir)
    build_train_data(cfg, tok)
    assert (first / COMPLETE).is_file()
    other_tok = train_tokenizer(DOCS, 300, tmp_path / "tok300")
    second = cache_path(train_source(cfg), other_tok, cfg.data_cache_dir)
    assert second != first
    build_train_data(cfg, other_tok)
    np.testing.assert_array_equal(
        cache_tokens(cfg, other_tok), reference_tokens(other_tok, DOCS[:40])
    )
    write(path, DOCS[:50])  # an edited file: another key, a rebuilt cache
    third = cache_path(train_source(cfg), tok, cfg.data_cache_dir)
    assert third not in (first, second)
    build_train_data(cfg, tok)
    np.testing.assert_array_equal(cache_tokens(cfg, tok), reference_tokens(tok, DOCS[:50]))
    assert sorted(
        p.name for p in (tmp_path / "cache" / "pretok").iterdir() if p.is_dir()
    ) == sorted(p.name for p in (first, second, third))


def test_cache_key_is_the_tokenizers_identity(tok, tmp_path):
    """The key holds the tokenizer's identity (train.data.cache.tokenizer_identity, which streamed
    positions record too), not its raw serialisation: a copy of the tokenizer that truncates and
    pads (settings encode_docs switches off, which change no id) finds the same cache."""
    cfg = make_cfg(write(tmp_path / "d.jsonl", DOCS[:10]), tmp_path)
    tok.save_pretrained(tmp_path / "copy")
    copy = load_tokenizer(str(tmp_path / "copy"))
    copy.backend_tokenizer.enable_truncation(max_length=8)
    copy.backend_tokenizer.enable_padding(length=8)
    src = train_source(cfg)
    assert cache_path(src, copy, cfg.data_cache_dir) == cache_path(src, tok, cfg.data_cache_dir)


def test_half_written_cache_is_never_used(tok, tmp_path, monkeypatch):
    path = write(tmp_path / "d.jsonl", DOCS[:30])
    cfg = make_cfg(path, tmp_path)
    final = cache_path(train_source(cfg), tok, cfg.data_cache_dir)
    # A folder at the final name without its COMPLETE marker (garbage inside), and a killed
    # builder's temporary folder: both are discarded and the cache is built afresh.
    final.mkdir(parents=True)
    (final / "meta.json").write_text("{}")
    (final / "kept-00000.bin").write_bytes(b"\x07" * 1000)
    stale = final.parent / f"{final.name}.tmp-dead"
    stale.mkdir()
    build_train_data(cfg, tok)
    assert (final / COMPLETE).is_file() and not stale.exists()
    np.testing.assert_array_equal(cache_tokens(cfg, tok), reference_tokens(tok, DOCS[:30]))
    # A build that dies half-way leaves nothing at the final name (and no temporary folder).
    cfg2 = make_cfg(path, tmp_path, data_cache_dir=str(tmp_path / "cache2"))
    import train.data.pretok as dp

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(dp, "_encode_parts", boom)
    with pytest.raises(KeyboardInterrupt):
        ensure_token_cache(train_source(cfg2), tok, cfg2.data_cache_dir, processes=1)
    final2 = cache_path(train_source(cfg2), tok, cfg2.data_cache_dir)
    assert not final2.exists() and not list(final2.parent.glob("*.tmp-*"))


def test_uint32_when_ids_exceed_uint16(tok, tmp_path):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    big = train_tokenizer(DOCS, 300, tmp_path / "big")
    big.add_tokens([f"<x{i}>" for i in range(65600 - len(big))])
    assert len(big) == 65600
    docs = [f"Tom saw <x{i}> and <x0>." for i in (65000, 65299, 7)]
    path = write(tmp_path / "d.jsonl", docs)
    cfg = make_cfg(path, tmp_path, block_size=4, batch_size=1)
    build_train_data(cfg, big)
    folder = cache_path(train_source(cfg), big, cfg.data_cache_dir)
    assert json.loads((folder / "meta.json").read_text())["dtype"] == "uint32"
    ids = cache_tokens(cfg, big)
    np.testing.assert_array_equal(ids, reference_tokens(big, docs))
    assert ids.max() == big.convert_tokens_to_ids("<x65299>") > 65535


def test_real_text_gpt2_cache(shared_data, gpt2_tokenizer_dir, tmp_path):
    tok = load_tokenizer(str(gpt2_tokenizer_dir))
    path = shared_data / "text" / "tinyshakespeare.txt"
    cfg = make_cfg(path, tmp_path, block_size=256, batch_size=8)
    ensure_token_cache(train_source(cfg), tok, cfg.data_cache_dir, shard_tokens=100_000)
    paras = [t for b in DocSource(str(path), "train", "text").iter_texts() for t in b]
    ids = cache_tokens(cfg, tok)
    assert (
        len(load_part(cache_path(train_source(cfg), tok, cfg.data_cache_dir), "kept").arrays) == 4
    )
    np.testing.assert_array_equal(ids[:5000], reference_tokens(tok, paras[:200])[:5000])
    assert (ids == tok.eos_token_id).sum() == len(paras) and ids.max() < 50257
    assert len(ids) > 300_000


def test_runs_from_a_complete_cache_without_datasets(tok, tmp_path, monkeypatch):
    path = write(tmp_path / "d.jsonl", DOCS[:30])
    cfg = make_cfg(path, tmp_path)
    want = list(build_train_data(cfg, tok))
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now fails
    assert all(torch.equal(a, b) for a, b in zip(want, build_train_data(cfg, tok)))
    cfg = make_cfg(path, tmp_path, data_cache_dir=str(tmp_path / "empty"))
    with pytest.raises(DataError, match="needs the `datasets` package"):
        build_train_data(cfg, tok)


def test_prepare_cli(tok, tmp_path, capsys):
    from train.prepare import main

    folder = tmp_path / "f"
    folder.mkdir()
    write(folder / "train.jsonl", DOCS[:50])
    write(folder / "validation.jsonl", DOCS[50:])
    tok_dir = tmp_path / "tokdir"
    tok.save_pretrained(tok_dir)
    conf = tmp_path / "c.json"
    conf.write_text(
        json.dumps(
            {
                "dataset_name": str(folder),
                "tokenizer_name": str(tok_dir),
                "pretokenize": True,
                "data_cache_dir": str(tmp_path / "cache"),
                "block_size": 16,
                "batch_size": 4,
            }
        )  # fmt: skip
    )
    assert main(["--config", str(conf), "--processes", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("built in") == 2 and "split 'validation'" in out
    assert main(["--config", str(conf)]) == 0
    assert capsys.readouterr().out.count("already complete") == 2
    assert main(["--config", str(conf), "--set", "text_column=story"]) == 2
    assert "no column 'story'" in capsys.readouterr().err
