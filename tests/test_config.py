"""train/config.py and `python -m train`'s handling of bad configs: one line, exit code 2, before
any data or model is loaded (the runs point at a dataset that does not exist and at log and
checkpoint folders that must not appear, so a late check would show up as a different error)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.child_env import child_env
from train.config import ConfigError, TrainConfig
from train.model_config import load_model_config

ROOT = Path(__file__).resolve().parents[1]

# The seed guide's train/config.json, value for value ("Training the Octo Model").
SEED_GUIDE_CONFIG = {
    "dataset_name": "roneneldan/TinyStories", "train_split": "train", "eval_split": "validation",
    "text_column": "text", "tokenizer_name": "gpt2", "block_size": 512, "batch_size": 16,
    "gradient_accumulation_steps": 4, "num_epochs": 1, "learning_rate": 0.0003,
    "weight_decay": 0.01, "warmup_steps": 100, "max_grad_norm": 1.0, "seed": 42,
    "log_interval_steps": 50, "eval_interval_steps": 500, "save_interval_steps": 5000,
    "eval_max_batches": 64, "checkpoint_dir": "checkpoints", "resume_from": None,
    "use_mixed_precision": True, "use_gradient_checkpointing": False,
}  # fmt: skip


def test_seed_config_is_the_seed_guide_value_for_value():
    """train/config.json is the guide's file (keys in its order, every value, and the types:
    1.0 stays a float, 512 an int), and TrainConfig's defaults of those keys are the guide's."""
    d = json.loads((ROOT / "train" / "config.json").read_text())
    assert list(d) == list(SEED_GUIDE_CONFIG)
    for key, value in SEED_GUIDE_CONFIG.items():
        assert d[key] == value and type(d[key]) is type(value), key
    defaults = TrainConfig().to_dict()
    assert {k: defaults[k] for k in SEED_GUIDE_CONFIG} == SEED_GUIDE_CONFIG
    assert TrainConfig.load(ROOT / "train" / "config.json") == TrainConfig()


def test_overrides_parse_as_json_and_round_trip(tmp_path):
    cfg = TrainConfig.load(None, ["batch_size=3", "eval_split=null", "dataset_name=a b.txt",
                                  "learning_rate=1e-3", "max_steps=7"])  # fmt: skip
    assert (cfg.batch_size, cfg.eval_split, cfg.dataset_name) == (3, None, "a b.txt")
    assert cfg.learning_rate == 1e-3 and cfg.max_steps == 7
    cfg.save(tmp_path / "c.json")
    assert TrainConfig.load(tmp_path / "c.json") == cfg


def test_model_config_default_is_seed_architecture_with_vocab_from_tokenizer(tmp_path):
    fields = load_model_config(TrainConfig())
    assert fields["vocab_size"] is None  # sized by the tokenizer
    assert (fields["hidden_size"], fields["num_hidden_layers"], fields["num_key_value_heads"]) == (
        768, 12, 3)  # fmt: skip
    p = tmp_path / "m.json"
    shape = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
             "num_attention_heads": 4, "num_key_value_heads": 1,
             "max_position_embeddings": 128}  # fmt: skip
    p.write_text(json.dumps(shape))
    fields = load_model_config(TrainConfig(block_size=128), str(p))
    assert fields["vocab_size"] == 512 and fields["rms_norm_eps"] == 1e-6
    with pytest.raises(ConfigError, match="exceeds the model's max_position_embeddings 128"):
        load_model_config(TrainConfig(block_size=129), str(p))


def test_saved_model_config_rebuilds_the_model_from_anywhere(tmp_path, monkeypatch):
    """A run saves model_config as a preset name or the resolved fields (resolved_model_config):
    its train_config.json rebuilds the same model from another folder, after the file changed."""
    from train.model_config import resolved_model_config

    shape = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
             "num_attention_heads": 4, "num_key_value_heads": 1,
             "max_position_embeddings": 128}  # fmt: skip
    (tmp_path / "m.json").write_text(json.dumps(shape))
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(model_config="m.json", block_size=64)
    fields = load_model_config(cfg)
    saved = TrainConfig(**{**cfg.to_dict(), "model_config": resolved_model_config(cfg, fields)})
    saved.save(tmp_path / "train_config.json")
    (tmp_path / "m.json").write_text(json.dumps({**shape, "hidden_size": 128}))  # edited later
    monkeypatch.chdir(ROOT)
    again = TrainConfig.load(tmp_path / "train_config.json")
    assert isinstance(again.model_config, dict) and load_model_config(again) == fields
    assert fields["vocab_size"] is None  # still sized by the tokenizer
    for preset in (None, "seed", "tiny"):
        c = TrainConfig(model_config=preset, block_size=64)
        assert resolved_model_config(c, load_model_config(c)) == (preset or "seed")
    with pytest.raises(ConfigError, match="fields in model_config: .*hiden_size"):
        load_model_config(TrainConfig(model_config={**shape, "hiden_size": 8}))


# (name, extra args, config-file contents or None, model-config contents or None, expected text)
MODEL_OK = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
            "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 128}  # fmt: skip
CASES = [
    ("unknown_key_file", [], {"lerning_rate": 1e-3}, None, "did you mean 'learning_rate'"),
    ("unknown_key_set", ["--set", "batch_sise=4"], {}, None, "did you mean 'batch_size'"),
    ("wrong_type_str", ["--set", "block_size=abc"], {}, None, "'block_size' must be int"),
    ("wrong_type_float", [], {"batch_size": 2.5}, None, "'batch_size' must be int"),
    ("wrong_type_bool", [], {"use_mixed_precision": "yes"}, None, "must be bool"),
    ("zero_batch", ["--set", "batch_size=0"], {}, None, "'batch_size' must be positive"),
    ("negative_accum", [], {"gradient_accumulation_steps": -1}, None,
     "'gradient_accumulation_steps' must be positive"),
    ("zero_lr", [], {"learning_rate": 0}, None, "'learning_rate' must be positive"),
    ("bad_choice", ["--set", "precision=fp8"], {}, None, "choose one of auto, bf16, fp16, fp32"),
    ("block_over_positions", ["--set", "block_size=8192"], {}, None,
     "block_size 8192 exceeds the model's max_position_embeddings 4096"),
    ("model_unknown_key", [], {}, {**MODEL_OK, "hiden_size": 64}, "did you mean 'hidden_size'"),
    ("model_missing", ["--model-config", "no/such/model.json"], {}, None,
     "neither a JSON file nor a preset"),
    ("config_missing", ["--config", "no/such/config.json"], None, None, "does not exist"),
    ("config_bad_json", [], "{not json", None, "not valid JSON"),
    ("set_without_equals", ["--set", "batch_size"], {}, None, "expected key=value"),
    ("shard_size_unparsable", ["--set", "max_shard_size=abc"], {}, None,
     "config key max_shard_size 'abc' is not a size; use an int (bytes) or a string like '2GB'"),
    ("block_size_one", ["--set", "block_size=1"], {}, None, "'block_size' must be at least 2"),
]  # fmt: skip


# Model-config errors import torch (octo) before failing, ~2 s a process on 2 cores: the cases above
# run as processes, these in-process through the same main().
IN_PROCESS = [
    ("block_over_model_file", ["--set", "block_size=256"], MODEL_OK,
     "block_size 256 exceeds the model's max_position_embeddings 128"),
    ("model_indivisible", [], {**MODEL_OK, "num_attention_heads": 5}, "not divisible"),
    ("model_non_positive", [], {**MODEL_OK, "num_hidden_layers": 0},
     "num_hidden_layers must be positive"),
    ("model_odd_head_dim", [], {**MODEL_OK, "hidden_size": 36, "num_attention_heads": 4},
     "odd"),
    ("preset_unknown", ["--model-config", "huge"], None, "neither a JSON file nor a preset"),
]  # fmt: skip


@pytest.mark.parametrize("case", IN_PROCESS, ids=[c[0] for c in IN_PROCESS])
def test_bad_model_config_in_process(tmp_path, capsys, case):
    from train.__main__ import main

    _, args, model, expected = case
    cfg = {"dataset_name": str(tmp_path / "missing.txt"), "log_dir": str(tmp_path / "logs"),
           "checkpoint_dir": str(tmp_path / "ckpt"), "block_size": 64}  # fmt: skip
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    argv = ["--config", str(tmp_path / "c.json"), *args]
    if model is not None:
        (tmp_path / "m.json").write_text(json.dumps(model))
        argv += ["--model-config", str(tmp_path / "m.json")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: ") and expected in err, err
    assert not (tmp_path / "logs").exists() and not (tmp_path / "ckpt").exists()


@pytest.fixture(scope="module")
def config_runs(tmp_path_factory):
    """Start every case's `python -m train` at once (they are independent), then collect them."""
    procs = {}
    for name, args, config, model, _ in CASES:
        d = tmp_path_factory.mktemp(name)
        base = {"dataset_name": str(d / "missing.txt"), "tokenizer_name": str(d / "no_tok"),
                "log_dir": str(d / "logs"), "checkpoint_dir": str(d / "ckpt"),
                "block_size": 64}  # fmt: skip
        cmd = [sys.executable, "-m", "train"]
        if config is not None:
            (d / "c.json").write_text(config if isinstance(config, str) else
                                      json.dumps({**base, **config}))  # fmt: skip
            cmd += ["--config", str(d / "c.json")]
        if model is not None:
            (d / "m.json").write_text(json.dumps(model))
            cmd += ["--model-config", str(d / "m.json")]
        procs[name] = (d, subprocess.Popen(cmd + args, cwd=d, env=child_env(),
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                           text=True))  # fmt: skip
    out = {}
    for name, (d, p) in procs.items():
        stdout, stderr = p.communicate(timeout=120)
        out[name] = (d, p.returncode, stdout, stderr)
    return out


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_config_is_one_line_and_exit_2(config_runs, case):
    name, _, _, _, expected = case
    d, rc, stdout, stderr = config_runs[name]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert rc == 2, (rc, stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert expected in lines[0], lines[0]
    assert stdout == ""
    assert not (d / "logs").exists() and not (d / "ckpt").exists()  # nothing was started


def test_a_bad_key_fails_before_torch_is_imported():
    """`python -m train --set bad_key=1` is answered from the config alone: torch (seconds of
    import; octo imports it) is never loaded, so a typo costs no start-up. Every module that
    train.config imports stays light (train.trackers imported octo.files, so torch, at its top)."""
    code = ("import sys; from train.__main__ import main; "
            "print(main(['--set', 'bad_key=1']), 'torch' in sys.modules)")  # fmt: skip
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(),
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.stdout.split() == ["2", "False"], (p.stdout, p.stderr)
    assert p.stderr.startswith("error: --set: unknown key 'bad_key'"), p.stderr


# Values no key means anything by: out of range, NaN/Infinity (JSON and --set accept both), a seed
# torch.manual_seed overflows on, "" for a path (it would mean the current folder).
BAD_VALUES = [
    ("adam_beta1=2", "'adam_beta1' must be in [0, 1), got 2"),
    ("adam_beta2=-0.5", "'adam_beta2' must be in [0, 1), got -0.5"),
    ("adam_eps=-1", "'adam_eps' must be positive, got -1"),
    ("adam_eps=0", "'adam_eps' must be positive, got 0"),
    ("learning_rate=Infinity", "'learning_rate' must be a finite number, got inf"),
    ("weight_decay=Infinity", "'weight_decay' must be a finite number, got inf"),
    ("weight_decay=NaN", "'weight_decay' must be a finite number, got nan"),
    ("max_grad_norm=NaN", "'max_grad_norm' must be a finite number, got nan"),
    ("min_lr_ratio=-Infinity", "'min_lr_ratio' must be a finite number, got -inf"),
    ("seed=100000000000000000000000", "'seed' must be in [-2**63, 2**64), got 1000"),
    ("data_cache_dir=", "'data_cache_dir' is an empty string; give a path"),
    ("log_dir=", "'log_dir' is an empty string; give a path"),
    ("checkpoint_dir=", "'checkpoint_dir' is an empty string; give a path"),
    ("resume_from=", "'resume_from' is an empty string; give a path (or null for none)"),
    ("max_shard_size=0", "max_shard_size must be positive, got 0"),
    ("optimizer=sgd", "'optimizer' is 'sgd'; choose one of adamw, muon"),
    ("muon_learning_rate=0", "'muon_learning_rate' must be positive, got 0"),
    ("muon_adamw_lr_scale=-1", "'muon_adamw_lr_scale' must be positive, got -1"),
    ("muon_momentum=1", "'muon_momentum' must be in [0, 1), got 1"),
    ("muon_weight_decay=-0.1", "'muon_weight_decay' must be >= 0, got -0.1"),
]  # fmt: skip


@pytest.mark.parametrize("override,expected", BAD_VALUES, ids=[c[0] for c in BAD_VALUES])
def test_out_of_range_values_are_one_line_config_errors(override, expected):
    with pytest.raises(ConfigError) as e:
        TrainConfig.load(None, [override])
    assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_edges_of_the_ranges_are_accepted():
    import torch

    cfg = TrainConfig.load(None, ["seed=18446744073709551615", "adam_beta2=0", "max_shard_size=7"])
    torch.Generator().manual_seed(cfg.seed)  # the largest seed torch accepts
    assert cfg.max_shard_size == 7  # an int of bytes, as the size message says
    assert TrainConfig.load(None, ["seed=-9223372036854775808", "resume_from=null"]).seed < 0
    # JSON's 0 is an int; torch's AdamW refused betas (0, 0.95) ("either both floats or both
    # Tensors"): float keys hold floats, so the optimizer builds at the edge of the range
    from train.optim import build_optimizer

    cfg = TrainConfig.load(None, ["adam_beta1=0", "learning_rate=1"])
    assert type(cfg.adam_beta1) is float and type(cfg.learning_rate) is float
    build_optimizer(torch.nn.Linear(2, 2), cfg, torch.device("cpu"))


def test_config_file_that_is_a_folder_or_not_utf8(tmp_path, capsys):
    with pytest.raises(ConfigError, match="is a folder; pass --config PATH to a JSON file"):
        TrainConfig.load(tmp_path)
    (tmp_path / "c.json").write_bytes(b'{"seed": "\xff"}')
    with pytest.raises(ConfigError, match="c.json is not UTF-8 text .*save it as UTF-8 JSON"):
        TrainConfig.load(tmp_path / "c.json")
    from train.__main__ import main  # the model config: same, through the command line

    (tmp_path / "ok.json").write_text("{}")
    for model, expected in ((tmp_path / "c.json", "c.json is not UTF-8 text"),
                            (tmp_path, "is a folder; pass a JSON file"),
                            ("", "model config is an empty string")):  # fmt: skip
        assert main(["--config", str(tmp_path / "ok.json"), "--model-config", str(model)]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and expected in err and err.count("model config") == 1, err


def test_model_config_floats_must_be_finite(tmp_path):
    from octo.config import OctoConfig

    for key, value in (("rope_theta", float("inf")), ("rms_norm_eps", float("nan")),
                       ("initializer_range", float("inf"))):  # fmt: skip
        with pytest.raises(ValueError, match=f"OctoConfig.{key} must be a finite number"):
            OctoConfig.preset("tiny", **{key: value})
    (tmp_path / "m.json").write_text(json.dumps({**MODEL_OK, "rope_theta": float("inf")}))
    with pytest.raises(ConfigError, match="rope_theta must be a finite number, got inf"):
        load_model_config(TrainConfig(block_size=64), str(tmp_path / "m.json"))


def test_triton_kernels_on_cpu_without_interpreter_is_a_config_error(monkeypatch):
    """kernels=triton on the CPU fails at start with the fix, not at the first forward pass."""
    pytest.importorskip("triton")
    from train.runtime import set_kernel_backend

    monkeypatch.setenv("OCTO_KERNELS", "auto")  # restored after the test
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match="kernels 'triton'.*set kernels=auto.*TRITON_INTERPRET=1"):
        set_kernel_backend(TrainConfig(kernels="triton", device="cpu"))
    monkeypatch.setenv("OCTO_KERNELS", "triton")  # from the shell, kernels auto: the same
    with pytest.raises(ConfigError, match=r"\(OCTO_KERNELS\)"):
        set_kernel_backend(TrainConfig(device="cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    set_kernel_backend(TrainConfig(kernels="triton", device="cpu"))  # the interpreter runs it


def test_a_gpu_number_this_machine_lacks_is_one_config_line(monkeypatch):
    """device=cuda:N past the GPUs present: a ConfigError naming those there are (it was an
    error deep in torch.cuda.set_device). The resolver is octo.device's, so CUDA is faked."""
    import torch

    from train.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError) as e:
        resolve_device(TrainConfig(device="cuda:2"))
    assert str(e.value) == (
        "config key 'device' is 'cuda:2', but this machine has 2 CUDA device(s), cuda:0 to "
        "cuda:1; use auto or one of those"
    )


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_more_torchrun_processes_than_gpus_is_one_config_line(monkeypatch, device):
    """device auto or cuda under torchrun takes GPU LOCAL_RANK: with more processes on a
    machine than it has GPUs, the line names the process count as the cause and its fix. It
    said "config key 'device' is 'auto' ...; use auto or one of those", advice that cannot
    help: the device already is auto, and cuda:N would put several ranks on one GPU."""
    import torch

    from train.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ConfigError) as e:
        resolve_device(TrainConfig(device=device))
    assert str(e.value) == (
        f"config key 'device' is {device!r}: this process is LOCAL_RANK 2 under torchrun, but "
        "this machine has 2 CUDA device(s), one per process; start at most 2 processes on it "
        "(torchrun --nproc_per_node 2)"
    )


def test_init_from_config_errors(tmp_path):
    """init_from: with resume_from, a missing folder, a file, a folder of checkpoints, and a
    model_config of another shape are each one ConfigError line, before anything loads; its
    config.json gives the shape (vocab_size included), and a saved config names the fields."""
    from train.model_config import resolved_model_config

    with pytest.raises(ConfigError, match="'init_from' and 'resume_from' are both set.*set one"):
        TrainConfig(init_from="a", resume_from="b")
    with pytest.raises(ConfigError, match="init_from no/such does not exist; name a final model"):
        load_model_config(TrainConfig(init_from="no/such"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="init_from .*file is a file"):
        load_model_config(TrainConfig(init_from=str(tmp_path / "file")))
    run = tmp_path / "run"
    (run / "checkpoint_step_5").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"has no config.json \(it holds a run's checkpoints: "
                                          rf"name {run / 'final'} or one of them\)"):  # fmt: skip
        load_model_config(TrainConfig(init_from=str(run)))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({**MODEL_OK, "vocab_size": 320}))
    cfg = TrainConfig(init_from=str(model), block_size=64)
    fields = load_model_config(cfg)
    assert fields["vocab_size"] == 320 and fields["hidden_size"] == 64
    assert resolved_model_config(cfg, fields) == fields  # the fields, not the "seed" preset
    # no vocab_size: left to the tokenizer, which the weights' 320 then fixes: the same shape
    (tmp_path / "same.json").write_text(json.dumps(MODEL_OK))
    assert load_model_config(cfg, str(tmp_path / "same.json")) == fields
    with pytest.raises(ConfigError, match="model_config gives hidden_size=768, but init_from "
                                          ".* has 64; set model_config to null"):  # fmt: skip
        load_model_config(TrainConfig(init_from=str(model), model_config="seed", block_size=64))
    with pytest.raises(ConfigError, match="block_size 512 exceeds the model's"):
        load_model_config(TrainConfig(init_from=str(model)))
