"""The config keys' documentation comes from one place, TrainConfig's fields: `python -m train
--help` lists every key (name, default, meaning, one line each) and the README's two key tables
are train.config_docs.key_table's output, verbatim."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from train.config import TrainConfig
from train.config_docs import format_default, key_table, seed_keys

ROOT = Path(__file__).resolve().parents[1]


def test_every_key_has_a_one_line_meaning():
    for f in dataclasses.fields(TrainConfig):
        text = f.metadata.get("help")
        assert text and "\n" not in text and "|" not in text, f.name


def test_readme_key_tables_are_the_fields():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for seed in (True, False):
        table = key_table(seed)
        assert table in readme, (
            "README.md's key table is out of date; replace it with:\n" + table  # to paste
        )
    assert seed_keys()[0] == "dataset_name" and "init_from" not in seed_keys()


def test_help_lists_every_key_with_its_default(capsys):
    from train.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out.splitlines()
    for f in dataclasses.fields(TrainConfig):
        prefix = f"    {f.name} = {format_default(f.default)}: "
        lines = [line for line in out if line.startswith(prefix)]
        assert len(lines) == 1, (f.name, prefix)
        assert lines[0] == prefix + f.metadata["help"].replace("`", "")


def test_defaults_print_as_the_json_spells_them():
    assert [format_default(v) for v in (None, True, 3e-4, 1e-8, 0.0, 512, "gpt2", "a b")] == [
        "null", "true", "0.0003", "1e-8", "0.0", "512", "gpt2", '"a b"'
    ]  # fmt: skip
