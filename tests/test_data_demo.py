"""The offline demo corpus: deterministic, consistent within a story, varied, built once."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys

import pytest

from train.data import demo as demo_corpus
from train.data.demo import PLOTS, generate_stories, story


def test_deterministic():
    a, b = list(generate_stories(50, 9)), list(generate_stories(50, 9))
    assert a == b and a != list(generate_stories(50, 10))
    # The same in another process with another hash seed (nothing depends on set/dict order).
    code = "import hashlib; from train.data.demo import generate_stories as g; "
    code += "print(hashlib.sha256('|'.join(g(200, 1)).encode()).hexdigest())"
    here = hashlib.sha256("|".join(generate_stories(200, 1)).encode()).hexdigest()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert out.stdout.strip() == here, out.stderr


def test_stories_are_consistent_and_varied():
    import random

    stories = list(generate_stories(2000, 4))
    assert len(set(stories)) == len(stories)
    first_sentences = {s.split(".")[0] for s in stories}
    assert len(first_sentences) > 1000
    for s in stories[:300]:
        hero = re.search(r"(?:named|called) (\w+)", s).group(1)
        assert s.count(hero) >= 3, s  # the hero's name carries through the story
        assert s.startswith(("Once upon a time", "There was once"))
    # Every plot is used, and each plot keeps its own consistency: the lost object is found.
    rng = random.Random(0)
    for plot in PLOTS:
        hero, friend = demo_corpus._Char(rng), demo_corpus._Char(rng)
        text = " ".join(plot(rng, hero, friend, "park", demo_corpus.PLACES["park"]))
        assert hero.name in text
    for _ in range(50):
        s = story(random.Random(_))
        m = re.search(r"had (?:a|an) (\w+) ([\w ]+?)\. It was", s)
        if m:
            assert f"the {m.group(1)} {m.group(2)}" in s.split("gone!")[1]
    words = {w for s in stories for w in re.findall(r"[A-Za-z]+", s)}
    assert len(words) > 400


def test_corpus_and_tokenizer_built_once(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    from train.data import load_tokenizer

    monkeypatch.setattr(demo_corpus, "N_TRAIN", 1500)  # a small corpus: this is about caching
    monkeypatch.setattr(demo_corpus, "N_VALID", 50)
    corpus = demo_corpus.ensure_demo_corpus(tmp_path)
    lines = (corpus / "train.jsonl").read_text().splitlines()
    assert len(lines) == 1500 and json.loads(lines[0])["text"] == next(generate_stories(1, 1))
    mtime = (corpus / "train.jsonl").stat().st_mtime_ns
    tok = load_tokenizer("octo-demo", cache_dir=tmp_path)
    assert tok.eos_token_id == 0 and 1000 < len(tok) <= demo_corpus.DEMO_VOCAB_SIZE
    assert demo_corpus.ensure_demo_corpus(tmp_path) == corpus
    assert (corpus / "train.jsonl").stat().st_mtime_ns == mtime  # not rebuilt
    again = load_tokenizer("octo-demo", cache_dir=tmp_path)
    assert again("Once upon a time").input_ids == tok("Once upon a time").input_ids
    assert sum(f.stat().st_size for f in corpus.iterdir()) < 1_500_000
