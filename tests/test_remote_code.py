"""No code from a tokenizer or model folder ever runs (octo/tokenizer_files.py): a folder whose
tokenizer_config.json or config.json has an `auto_map` is refused in one line naming the file
and the key, by training, by the generate CLI and by from_pretrained; the folder's Python file,
which would leave a marker file if it ever ran, never runs; saves carry no auto_map and no code
file; every transformers call in octo/ and train/ passes trust_remote_code=False."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest

from octo import OctoConfig, OctoForCausalLM
from octo.generate import main as generate_main
from octo.tokenizer_files import save_tokenizer
from train.__main__ import main as train_main

ROOT = Path(__file__).resolve().parents[1]


def evil_folder(tmp_path: Path, corpus, where: str) -> tuple[Path, Path]:
    """A copy of the stories tokenizer with an auto_map in `where` (a JSON file) naming evil.py,
    a module that writes the returned marker file when imported; (folder, marker)."""
    folder, marker = tmp_path / "evil_tok", tmp_path / "EXECUTED"
    shutil.copytree(corpus["tokenizer"], folder)
    (folder / "evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n"
    )
    path = folder / where
    d = json.loads(path.read_text()) if path.is_file() else {"model_type": "llama"}
    d["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}
    if where == "tokenizer_config.json":
        d.pop("tokenizer_class", None)  # so that transformers would have to use the auto_map
    path.write_text(json.dumps(d))
    return folder, marker


@pytest.mark.parametrize("where", ["tokenizer_config.json", "config.json"])
def test_training_refuses_a_tokenizer_with_code(tmp_path, corpus, capsys, where):
    folder, marker = evil_folder(tmp_path, corpus, where)
    cfg = {"dataset_name": str(corpus["data"]), "tokenizer_name": str(folder),
           "log_dir": str(tmp_path / "logs"), "checkpoint_dir": str(tmp_path / "ckpt"),
           "data_cache_dir": str(tmp_path / "cache"), "block_size": 32, "batch_size": 2,
           "max_steps": 2, "num_workers": 0}  # fmt: skip
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    rc = train_main(["--config", str(tmp_path / "c.json"), "--model-config", "tiny"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err, err
    assert f"{folder / where} has an 'auto_map' key" in err and "never runs code" in err, err
    assert not marker.exists()
    assert not any((tmp_path / "ckpt").iterdir())  # nothing saved, so no code file copied


@pytest.mark.parametrize("where", ["tokenizer_config.json", "config.json"])
def test_generate_refuses_a_tokenizer_with_code(tmp_path, corpus, capsys, where):
    folder, marker = evil_folder(tmp_path, corpus, where)
    OctoForCausalLM(OctoConfig.preset("tiny", vocab_size=512)).save_pretrained(tmp_path / "m")
    rc = generate_main(["--checkpoint", str(tmp_path / "m"), "--tokenizer", str(folder),
                        "--prompt", "Once", "--max-new-tokens", "2"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err, err
    assert f"{folder / where} has an 'auto_map' key" in err, err
    assert not marker.exists()


def test_a_model_config_with_code_is_refused(tmp_path, capsys):
    """A checkpoint whose config.json has an auto_map: from_pretrained and the generate CLI
    (whose tokenizer would come from the same folder) refuse it in one line."""
    folder = tmp_path / "m"
    OctoForCausalLM(OctoConfig.preset("tiny")).save_pretrained(folder)
    d = json.loads((folder / "config.json").read_text())
    d["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="has an 'auto_map' \\(custom model code\\)"):
        OctoForCausalLM.from_pretrained(folder)
    assert generate_main(["--checkpoint", str(folder), "--prompt", "Once"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "auto_map" in err and str(folder / "config.json") in err, err


def test_saved_tokenizers_name_no_code(tmp_path, corpus):
    """A tokenizer that carries an auto_map in its init arguments (as one loaded with remote code
    would) is saved without it, and no code file is written beside it."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = AutoTokenizer.from_pretrained(corpus["tokenizer"], trust_remote_code=False)
    marked = PreTrainedTokenizerFast(
        tokenizer_object=tok.backend_tokenizer, eos_token=tok.eos_token,
        auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]},
    )  # fmt: skip
    marked.save_pretrained(tmp_path / "plain")  # transformers itself keeps the auto_map
    assert "auto_map" in json.loads((tmp_path / "plain" / "tokenizer_config.json").read_text())
    save_tokenizer(marked, tmp_path / "out", model_max_length=64)
    saved = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert "auto_map" not in saved and saved["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert not [p for p in (tmp_path / "out").iterdir() if p.suffix == ".py"]


def test_every_transformers_load_refuses_remote_code():
    """Every from_pretrained of a transformers Auto class in octo/ and train/ passes
    trust_remote_code=False (None would ask y/N on a terminal, and a y runs the code), and every
    tokenizer load goes through the one guarded function, octo.tokenizer_files.auto_tokenizer
    (which checks a local folder for an auto_map first): no other module imports AutoTokenizer
    (under any name), and its one from_pretrained call is in auto_tokenizer."""
    calls, imports = [], []
    for path in [*ROOT.glob("octo/**/*.py"), *ROOT.glob("train/**/*.py")]:
        rel = path.relative_to(ROOT).as_posix()
        tree = ast.parse(path.read_text())
        functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("transformers"):
                imports += [rel for a in node.names if a.name == "AutoTokenizer"]
            func = getattr(node, "func", None)
            if not (isinstance(node, ast.Call) and isinstance(func, ast.Attribute)):
                continue
            if func.attr != "from_pretrained" or not getattr(func.value, "id", "").startswith(
                "Auto"
            ):
                continue
            inside = [f.name for f in functions if f.lineno <= node.lineno <= f.end_lineno]
            calls.append((rel, func.value.id, inside[-1] if inside else None))
            trust = [k.value for k in node.keywords if k.arg == "trust_remote_code"]
            assert len(trust) == 1 and isinstance(trust[0], ast.Constant), calls[-1]
            assert trust[0].value is False, calls[-1]
    assert imports == ["octo/tokenizer_files.py"], imports
    guarded = ("octo/tokenizer_files.py", "AutoTokenizer", "auto_tokenizer")
    assert [c for c in calls if c[1] == "AutoTokenizer"] == [guarded], calls
