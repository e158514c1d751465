"""The config keys as people read them: `python -m train --help` and the README's key tables.

Both are rendered from TrainConfig's fields (name, default, the `help` of their metadata), so a
key is documented in one place. The seed's keys are those of train/config.json (the seed guide's
file); the README lists them first, then the further keys. tests/test_config_docs.py checks that
the README's tables are key_table()'s output, verbatim.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from train.config import TrainConfig

SEED_CONFIG = Path(__file__).resolve().parent / "config.json"


def format_default(value: Any) -> str:
    """A default as the config JSON spells it: null, true, 0.0003, 1e-8, a bare word, or a quoted
    string when it holds a space."""
    if isinstance(value, float):
        text = repr(value)
        if "e" in text:  # 1e-08 -> 1e-8
            mantissa, exponent = text.split("e")
            text = f"{mantissa}e{int(exponent)}"
        return text
    if isinstance(value, str) and " " not in value:
        return value
    return json.dumps(value)


def seed_keys() -> list[str]:
    """The keys of train/config.json, in its order."""
    return list(json.loads(SEED_CONFIG.read_text(encoding="utf-8")))


def keys(seed: bool) -> list[dataclasses.Field]:
    """TrainConfig's fields: the seed's (in train/config.json's order), or all the others (in
    the dataclass's order)."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    names = seed_keys()
    if seed:
        return [fields[n] for n in names]
    return [f for f in fields.values() if f.name not in names]


def key_table(seed: bool) -> str:
    """The README's markdown table of the seed's keys (seed=True) or of the further keys."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for f in keys(seed):
        rows.append(f"| {f.name} | {format_default(f.default)} | {f.metadata['help']} |")
    return "\n".join(rows)


def help_epilog() -> str:
    """`python -m train --help`'s list of every config key: name, default, meaning, one line
    each (the README's text without its markdown backticks)."""
    lines = ["config keys (in the --config JSON, or --set KEY=VALUE), default and meaning:"]
    for title, seed in (("the seed's keys (train/config.json)", True), ("further keys", False)):
        lines.append(f"  {title}:")
        for f in keys(seed):
            meaning = f.metadata["help"].replace("`", "")
            lines.append(f"    {f.name} = {format_default(f.default)}: {meaning}")
    return "\n".join(lines)
