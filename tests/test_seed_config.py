"""The seed's train/config.json as shipped: only where its data, tokenizer, model and outputs live
are changed (no Hub here, a tiny model for a CPU; the test corpus's validation split is smaller
than one seed batch, so it evaluates on train). It sets neither max_steps nor pretokenize, so
the run must count its tokens (pretokenize null pre-tokenizes) and plan num_epochs of them."""

from __future__ import annotations

import json
import os
from pathlib import Path

from train.__main__ import DEFAULT_CONFIG, main


def test_seed_config_runs_one_epoch(corpus, tmp_path: Path):
    seed = json.loads(DEFAULT_CONFIG.read_text())
    assert seed.get("max_steps") is None and "pretokenize" not in seed
    from octo.config import PRESETS

    model = tmp_path / "model.json"  # the tiny preset, long enough for the seed's block_size 512
    fields = {**PRESETS["tiny"], "max_position_embeddings": 512}
    fields.pop("vocab_size", None)  # sized by the tokenizer, as with the seed
    model.write_text(json.dumps(fields))
    saved = dict(os.environ)
    try:
        code = main([
            "--config", str(DEFAULT_CONFIG), "--model-config", str(model), "--set",
            f"dataset_name={corpus['data']}", f"tokenizer_name={corpus['tokenizer']}",
            f"data_cache_dir={tmp_path / 'cache'}", f"checkpoint_dir={tmp_path / 'ckpt'}",
            f"log_dir={tmp_path / 'logs'}", "device=cpu", "eval_max_batches=1", "eval_split=train",
            "sample_max_new_tokens=2",
        ])  # fmt: skip
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert code == 0
    records = [json.loads(line) for f in (tmp_path / "logs").glob("training_*.jsonl")
               for line in f.read_text().splitlines()]  # fmt: skip
    meta = json.loads(next((tmp_path / "cache" / "pretok").glob("*/meta.json")).read_text())
    per_step = 16 * 512 * 4  # the seed's batch_size x block_size x gradient_accumulation_steps
    steps = meta["parts"]["kept"]["tokens"] // 512 // 16 // 4  # whole batches, one epoch
    assert steps >= 1, f"the test corpus is smaller than one seed step ({per_step} tokens)"
    end = next(r for r in records if r["type"] == "end")
    assert end["status"] == "completed" and end["step"] == steps
    assert (tmp_path / "ckpt" / "final" / "config.json").is_file()
