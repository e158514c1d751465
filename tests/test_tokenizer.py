"""train/tokenizer.py: a byte-level BPE trained on a config's text column, loadable offline."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("datasets")

from train.data import DataError, load_tokenizer  # noqa: E402
from train.data.bpe import BOS, EOS, train_tokenizer  # noqa: E402
from train.data.demo import generate_stories  # noqa: E402
from train.tokenizer import main  # noqa: E402

DOCS = list(generate_stories(200, seed=3))


def test_cli_trains_a_tokenizer_that_loads_offline(tmp_path, monkeypatch, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"story": t}) + "\n" for t in DOCS))
    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({"dataset_name": str(data), "text_column": "story"}))
    out = tmp_path / "tok"
    assert main(["--config", str(conf), "--vocab-size", "600", "--out", str(out)]) == 0
    assert "200 documents" in capsys.readouterr().out
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 600
    assert (tok.eos_token, tok.eos_token_id, tok.bos_token, tok.bos_token_id) == (EOS, 0, BOS, 1)
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == (
        "PreTrainedTokenizerFast"
    )
    # Byte-level: any text round-trips, nothing is unknown; no special tokens are added.
    for text in (DOCS[0], "Ünïcödé ✓ 你好 \t\n  spaces", "Tom"):
        ids = tok(text).input_ids
        assert tok.decode(ids) == text and EOS not in tok.convert_ids_to_tokens(ids)
    assert len(tok(DOCS[0]).input_ids) < len(DOCS[0].encode()) / 2  # merges learned
    # tokenizer_name: DIR works through the data module.
    assert load_tokenizer(str(out)).eos_token_id == 0


def test_max_docs_and_bad_arguments(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({"dataset_name": str(data)}))
    args = ["--config", str(conf), "--vocab-size", "400", "--out", str(tmp_path / "t")]
    assert main([*args, "--max-docs", "50"]) == 0
    assert "50 documents" in capsys.readouterr().out
    assert main([*args, "--set", "text_column=nope"]) == 2
    err = capsys.readouterr().err
    assert "no column 'nope'" in err and err.count("\n") == 1
    with pytest.raises(DataError, match="below the 258"):
        train_tokenizer(DOCS, 100, tmp_path / "small")


def test_bad_out_and_max_docs_are_one_line_before_training(tmp_path, capsys):
    """--out naming a file, or a path under one, was a NotADirectoryError traceback after the
    training; --max-docs -1 was islice's ValueError traceback."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS[:20]))
    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({"dataset_name": str(data)}))
    afile = tmp_path / "afile"
    afile.write_text("keep")
    args = ["--config", str(conf), "--vocab-size", "300"]
    for out, needle in (
        (afile, f"--out {afile} is a file; name a folder"),
        (afile / "x", f"--out {afile / 'x'}: cannot create that folder (Not a directory)"),
    ):
        assert main([*args, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {needle}") and err.count("\n") == 1
    assert afile.read_text() == "keep"
    for n in ("-1", "0"):
        assert main([*args, "--out", str(tmp_path / "t"), "--max-docs", n]) == 2
        err = capsys.readouterr().err
        assert err == f"error: --max-docs must be a positive number of documents, got {n}; " + (
            "leave it out to use them all\n"
        )
    with pytest.raises(DataError, match="cannot write the tokenizer to"):
        train_tokenizer(DOCS[:20], 300, afile / "y")


def test_set_takes_the_forms_train_takes(tmp_path, capsys):
    """`--set a=1 b=2` (as `python -m train` takes it) was 'unrecognized arguments' here and in
    train.prepare: the second value now reaches the config (and is checked there)."""
    from train.prepare import main as prepare_main

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS[:20]))
    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({"dataset_name": str(data)}))
    args = ["--config", str(conf), "--vocab-size", "300", "--out", str(tmp_path / "t")]
    assert main([*args, "--set", "seed=3", "text_column=nope", "--set", "seed=4"]) == 2
    assert "no column 'nope'" in capsys.readouterr().err
    assert prepare_main(["--config", str(conf), "--set", "seed=3", "nokey=1"]) == 2
    assert "unknown key 'nokey'" in capsys.readouterr().err
