"""Shared fixtures: seeding, the shared data folder, and the gpu marker's skip."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated (at import), so set it before any
# test imports `kernels`: without a GPU, Triton kernels run on CPU tensors through the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout; tests that need it skip (with a reason) without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir(shared_data, tmp_path_factory) -> Path:
    """A transformers tokenizer folder built offline from ../shared/data/gpt2 (once per session,
    ~2 s; tests read it, none writes into it)."""
    from transformers import GPT2TokenizerFast

    out = tmp_path_factory.mktemp("gpt2_tok")
    vocab, merges = (
        str(shared_data / "gpt2" / "vocab.json"),
        str(shared_data / "gpt2" / "merges.txt"),
    )
    # transformers 5 names the files vocab=/merges= and silently ignores vocab_file=/merges_file=
    # (leaving a 1-token tokenizer); 4.x is the other way round.
    if "vocab" in inspect.signature(GPT2TokenizerFast.__init__).parameters:
        tok = GPT2TokenizerFast(vocab=vocab, merges=merges)
    else:
        tok = GPT2TokenizerFast(vocab_file=vocab, merges_file=merges)
    assert len(tok) == 50257 and tok("Hello world").input_ids == [15496, 995]
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """A folder with train.jsonl / validation.jsonl of generated stories, its 512-token BPE, and
    a data cache shared by the runs (for tests that run `python -m train` end to end)."""
    import json

    from train.data.bpe import train_tokenizer
    from train.data.demo import generate_stories

    root = tmp_path_factory.mktemp("stories")
    data = root / "stories"
    data.mkdir()
    for split, n, seed in (("train", 300, 1), ("validation", 30, 2)):
        with open(data / f"{split}.jsonl", "w") as f:
            for text in generate_stories(n, seed):
                f.write(json.dumps({"text": text}) + "\n")
    texts = [json.loads(line)["text"] for line in open(data / "train.jsonl")]
    train_tokenizer(texts, 512, root / "tokenizer")
    return {"data": data, "tokenizer": root / "tokenizer", "cache": root / "cache"}
