"""Exact resume: after load_state_dict the next batches are torch.equal to an uninterrupted run's,
in both modes, with 0 and 2 workers, shuffled, across file/shard, window and epoch boundaries."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("datasets")

from train.config import TrainConfig  # noqa: E402
from train.data import DataError, build_train_data, train_source  # noqa: E402
from train.data.bpe import train_tokenizer  # noqa: E402
from train.data.demo import generate_stories  # noqa: E402
from train.data.pretok import ensure_token_cache, load_part  # noqa: E402
from train.data.stream import batch_size_change_effect  # noqa: E402

DOCS = list(generate_stories(90, seed=11))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(DOCS, 400, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three files: the streams cross file boundaries (datasets' shards)."""
    d = tmp_path_factory.mktemp("corpus")
    for k in range(3):
        with open(d / f"part{k}.jsonl", "w") as fh:
            for t in DOCS[30 * k : 30 * k + 30]:
                fh.write(json.dumps({"text": t}) + "\n")
    return str(d / "part*.jsonl")


def make_cfg(corpus, tmp_path, **kw) -> TrainConfig:
    base = dict(
        dataset_name=corpus,
        eval_split=None,
        block_size=16,
        batch_size=4,
        buffer_size=20,  # windows of 5 batches
        num_epochs=2,
        seed=3,
        num_workers=0,
        data_cache_dir=str(tmp_path / "cache"),
        pretokenize=False,  # streamed unless a test asks (null would pre-tokenize: no max_steps)
    )
    return TrainConfig(**{**base, **kw})


def run(cfg, tok, rank=0, world=1):
    data = build_train_data(cfg, tok, rank, world)
    out = []
    for b in data:
        out.append((data.epoch, b))
    return out


def check_resume(cfg, tok, ref, cuts, rank=0, world=1, compare=10):
    for k in cuts:
        data = build_train_data(cfg, tok, rank, world)
        for _ in range(k):
            next(data)
        state = json.loads(
            json.dumps(data.state_dict())
        )  # JSON-serialisable, as checkpoints store it
        resumed = build_train_data(cfg, tok, rank, world)
        resumed.load_state_dict(state)
        n = len(ref) - k if k in (cuts[0], cuts[-1]) else min(compare, len(ref) - k)
        for i in range(n):
            b = next(resumed)
            assert resumed.epoch == ref[k + i][0], (k, i)
            assert torch.equal(b, ref[k + i][1]), (
                f"resumed after {k} batches: batch {k + i} differs"
            )
        if k + n == len(ref):
            with pytest.raises(StopIteration):
                next(resumed)


def epoch_cuts(ref) -> list[int]:
    e0 = sum(1 for ep, _ in ref if ep == 0)
    return sorted({0, 3, 5, 11, e0 - 2, e0 - 1, e0, e0 + 1, e0 + 6, len(ref) - 1, len(ref)})


@pytest.mark.parametrize("workers", [0, 2])
def test_streaming_resume_is_exact(corpus, tok, tmp_path, workers):
    cfg = make_cfg(corpus, tmp_path, num_workers=workers)
    ref = run(cfg, tok)
    again = run(cfg, tok)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(ref, again)) and len(ref) == len(again)
    assert {ep for ep, _ in ref} == {0, 1}
    check_resume(cfg, tok, ref, epoch_cuts(ref))


def test_streaming_resume_two_ranks(corpus, tok, tmp_path):
    cfg = make_cfg(corpus, tmp_path, num_workers=2, num_epochs=1)
    for rank in range(2):
        ref = run(cfg, tok, rank, 2)
        check_resume(cfg, tok, ref, [0, 7, len(ref) - 3], rank, 2)


def test_streaming_ranks_are_the_streams_of_one_process(corpus, tok, tmp_path):
    """Issue 7: each rank streams its own part of the documents. 2 ranks x 1 worker are the same 2
    streams (stream s reads the documents j with j % 2 == s) as 1 process x 2 workers, which hands
    them out in turn: the process's batches are rank 0's and rank 1's, interleaved, exactly."""
    one = run(make_cfg(corpus, tmp_path, num_workers=2, num_epochs=1), tok)
    two = make_cfg(corpus, tmp_path, num_workers=0, num_epochs=1)
    ranks = [run(two, tok, r, 2) for r in range(2)]
    n = min(len(r) for r in ranks)
    assert n > 5
    for i in range(n):
        for r in range(2):
            assert torch.equal(one[2 * i + r][1], ranks[r][i][1]), (i, r)
    assert not torch.equal(ranks[0][0][1], ranks[1][0][1])


def test_streaming_resume_refuses_another_layout(corpus, tok, tmp_path):
    data = build_train_data(make_cfg(corpus, tmp_path, num_workers=2), tok)
    next(data)
    state = data.state_dict()
    for change in ({"num_workers": 1}, {"seed": 4}, {"pretokenize": True}):
        other = build_train_data(make_cfg(corpus, tmp_path, **change), tok)
        with pytest.raises(DataError) as e:
            other.load_state_dict(state)
        assert "\n" not in str(e.value) and "set" in str(e.value)


def test_streaming_resume_with_another_batch_size_goes_on(corpus, tok, tmp_path, caplog):
    """Issue 6: a changed batch size is no error. The stream restarts its current shuffle window
    in batches of the new size: with buffer 20 both sizes make 20-block windows, so the blocks
    from that window on are the uninterrupted run's, in its order. The data says nothing itself:
    the trainer's one warning line (train.checkpoint.resume_warnings) says what it does."""
    data = build_train_data(make_cfg(corpus, tmp_path), tok)  # 4 x 16, windows of 5 batches
    straight = [next(data) for _ in range(12)]
    data = build_train_data(make_cfg(corpus, tmp_path), tok)
    for _ in range(7):  # two batches into the second window
        next(data)
    state = data.state_dict()
    other = build_train_data(make_cfg(corpus, tmp_path, batch_size=2), tok)
    with caplog.at_level("DEBUG", logger="train"):
        other.load_state_dict(state)
    assert not caplog.records
    assert batch_size_change_effect(state, 2) == (
        "each data stream restarts its current shuffle window, so up to 20 blocks per stream "
        "are seen again"
    )
    assert batch_size_change_effect(state, 4) is None
    got = torch.cat([next(other) for _ in range(14)])
    assert got.shape == (28, 16)
    torch.testing.assert_close(got, torch.cat(straight[5:12]), rtol=0, atol=0)


def test_unshuffled_stream_continues_exactly_with_another_batch_size(corpus, tok, tmp_path):
    """buffer_size 0: every window is one batch, so no stream is inside a window and a new batch
    size re-reads nothing (batch_size_change_effect: None, no clause in the warning)."""
    data = build_train_data(make_cfg(corpus, tmp_path, buffer_size=0), tok)
    straight = [next(data) for _ in range(12)]
    data = build_train_data(make_cfg(corpus, tmp_path, buffer_size=0), tok)
    for _ in range(5):
        next(data)
    state = data.state_dict()
    assert batch_size_change_effect(state, 2) is None
    other = build_train_data(make_cfg(corpus, tmp_path, buffer_size=0, batch_size=2), tok)
    other.load_state_dict(state)
    got = torch.cat([next(other) for _ in range(14)])
    torch.testing.assert_close(got, torch.cat(straight[5:12]), rtol=0, atol=0)


@pytest.mark.parametrize("workers", [0, 2])
def test_pretokenized_resume_is_exact(corpus, tok, tmp_path, workers):
    cfg = make_cfg(corpus, tmp_path, pretokenize=True, num_workers=workers)
    # Shards of 1000 tokens: many blocks span two shards.
    folder = ensure_token_cache(train_source(cfg), tok, cfg.data_cache_dir, shard_tokens=1000)
    assert len(load_part(folder, "kept").arrays) > 10
    ref = run(cfg, tok)
    assert len(ref) == 2 * build_train_data(cfg, tok).batches_per_epoch()
    check_resume(cfg, tok, ref, epoch_cuts(ref))


def test_pretokenized_resume_two_ranks_and_rank_union(corpus, tok, tmp_path):
    cfg = make_cfg(corpus, tmp_path, pretokenize=True)
    single = [b for _, b in run(cfg, tok)]
    ranks = [run(cfg, tok, r, 2) for r in range(2)]
    # Global batch g of the single-process order is rank 0's + rank 1's batch g // 2 of 2 ranks.
    merged = [torch.cat([ranks[0][i][1], ranks[1][i][1]]) for i in range(len(ranks[0]))]
    per_epoch = len(single) // 2
    assert torch.equal(merged[0], torch.cat(single[0:2]))
    assert torch.equal(merged[len(merged) // 2], torch.cat(single[per_epoch : per_epoch + 2]))
    check_resume(cfg, tok, ranks[1], [0, 5, len(ranks[1]) - 1], 1, 2)


# ----- the tokenizer and text column are part of a streamed position (audit finding 6) -----------


def test_streaming_resume_refuses_another_tokenizer_or_text_column(corpus, tok, tmp_path):
    """Resuming a streamed run with another tokenizer of the same size used to train on silently
    on other token ids (loss 0.87 -> 8.3); another text_column likewise reads other text."""
    data = build_train_data(make_cfg(corpus, tmp_path), tok)
    next(data)
    state = json.loads(json.dumps(data.state_dict()))
    other_tok = train_tokenizer(DOCS[::-1][:60], 400, tmp_path / "other_tok")
    assert len(other_tok) == len(tok)
    other = build_train_data(make_cfg(corpus, tmp_path), other_tok)
    with pytest.raises(DataError, match="another tokenizer.*set tokenizer_name") as e:
        other.load_state_dict(state)
    assert "\n" not in str(e.value)
    two = tmp_path / "two_columns.jsonl"
    two.write_text("".join(json.dumps({"text": t, "story": t[::-1]}) + "\n" for t in DOCS))
    by_text = build_train_data(make_cfg(str(two), tmp_path), tok)
    next(by_text)
    renamed = build_train_data(make_cfg(str(two), tmp_path, text_column="story"), tok)
    with pytest.raises(DataError, match="text_column was 'text', this run's is 'story'"):
        renamed.load_state_dict(by_text.state_dict())
    # A position saved before these keys were recorded still resumes.
    old = {k: v for k, v in state.items() if k not in ("tokenizer", "text_column")}
    build_train_data(make_cfg(corpus, tmp_path), tok).load_state_dict(old)


def test_tokenizer_identity_is_the_same_for_every_copy(tok, tmp_path, gpt2_tokenizer_dir):
    """The same tokenizer from its folder, from a checkpoint's copy (save_pretrained, as
    save_checkpoint does) reloaded, and after a call that set truncation and padding, has one
    identity, so a legitimate resume is never refused. GPT-2 as built from the Hub's
    vocab.json/merges.txt (offline) and its saved copy too."""
    from train.data import load_tokenizer
    from train.data.cache import tokenizer_identity

    for original in (tok, load_tokenizer(str(gpt2_tokenizer_dir))):
        want = tokenizer_identity(original)
        original.save_pretrained(str(tmp_path / "copy"))
        copy = load_tokenizer(str(tmp_path / "copy"))
        original.pad_token = original.eos_token
        original(["a b c", "d"], truncation=True, max_length=2, padding="max_length")
        assert tokenizer_identity(copy) == want == tokenizer_identity(original)
    assert tokenizer_identity(tok) != tokenizer_identity(load_tokenizer(str(gpt2_tokenizer_dir)))
