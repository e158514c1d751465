"""OctoConfig: the model's shape, JSON in and out, and transformers' Llama config.json.

The fields are exactly the seed's model parameters plus tie_word_embeddings and
initializer_range; every impossible value raises ValueError naming the field and the value.
A config is frozen: built and validated once, then only read (dataclasses.replace makes another).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


def nearest_key(key: str, names: Sequence[str], cutoff: float = 0.6) -> str | None:
    """The name in `names` closest to a mistyped `key` (difflib's ratio >= cutoff), or None: for
    "did you mean ...?" in a config's unknown-key message."""
    near = difflib.get_close_matches(key, names, n=1, cutoff=cutoff)
    return near[0] if near else None


@dataclasses.dataclass(frozen=True)
class OctoConfig:
    """Shape of an Octo (Llama) model. head_dim = hidden_size / num_attention_heads."""

    vocab_size: int = 16000
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_key_value_heads: int = 3
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        """Raise ValueError naming the first impossible field."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            expected = {"int": int, "float": (int, float), "bool": bool}[f.type]
            if isinstance(value, bool) and f.type != "bool" or not isinstance(value, expected):
                raise ValueError(f"OctoConfig.{f.name} must be {f.type}, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):  # JSON allows Infinity, NaN
                raise ValueError(f"OctoConfig.{f.name} must be a finite number, got {value}")
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"OctoConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("rms_norm_eps", "rope_theta", "initializer_range"):
            if not getattr(self, name) > 0:
                raise ValueError(f"OctoConfig.{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"OctoConfig.hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"OctoConfig.num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"OctoConfig head_dim = hidden_size / num_attention_heads = {self.hidden_size} / "
                f"{self.num_attention_heads} = {self.head_dim} is odd; rotary embeddings need an "
                "even head_dim"
            )

    # ----- the tensors of a model of this shape, without building it ------------------------
    # (octo/model.py defines the modules; tests/test_model.py checks that the two agree)

    def _layer_shapes(self) -> dict[str, tuple[int, ...]]:
        """{name within model.layers.N: shape} of one decoder layer."""
        C, F, H, K, D = (self.hidden_size, self.intermediate_size, self.num_attention_heads,
                         self.num_key_value_heads, self.head_dim)  # fmt: skip
        shapes = {
            "input_layernorm.weight": (C,),
            "self_attn.q_proj.weight": (H * D, C),
            "self_attn.k_proj.weight": (K * D, C),
            "self_attn.v_proj.weight": (K * D, C),
            "self_attn.o_proj.weight": (C, H * D),
            "post_attention_layernorm.weight": (C,),
            "mlp.gate_proj.weight": (F, C),
            "mlp.up_proj.weight": (F, C),
            "mlp.down_proj.weight": (C, F),
        }
        if self.attention_bias:
            for proj, n in (("q", H * D), ("k", K * D), ("v", K * D), ("o", C)):
                shapes[f"self_attn.{proj}_proj.bias"] = (n,)
        return shapes

    def _outer_shapes(self) -> dict[str, tuple[int, ...]]:
        """The tensors outside the layers; a tied lm_head is embed_tokens, so it is not one."""
        shapes = {"model.embed_tokens.weight": (self.vocab_size, self.hidden_size),
                  "model.norm.weight": (self.hidden_size,)}  # fmt: skip
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, self.hidden_size)
        return shapes

    def weight_shapes(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every tensor a checkpoint of this model stores (transformers' Llama
        names; a tied lm_head is not stored), lazily: a config declaring a million layers is
        compared with a checkpoint's few without listing them all."""
        yield from self._outer_shapes().items()
        layer = self._layer_shapes()
        for i in range(self.num_hidden_layers):
            for suffix, shape in layer.items():
                yield f"model.layers.{i}.{suffix}", shape

    def weight_shape(self, name: str) -> tuple[int, ...] | None:
        """The shape of the stored tensor `name`, or None when this model has no such tensor."""
        outer = self._outer_shapes()
        if name in outer:
            return outer[name]
        m = re.fullmatch(r"model\.layers\.(0|[1-9]\d*)\.(.+)", name)
        if m is None or int(m.group(1)) >= self.num_hidden_layers:
            return None
        return self._layer_shapes().get(m.group(2))

    def num_weights(self) -> int:
        """How many tensors weight_shapes() yields, computed, not counted."""
        return len(self._outer_shapes()) + self.num_hidden_layers * len(self._layer_shapes())

    def num_parameters(self) -> int:
        """Parameters of the model (a tied lm_head counted once), computed without building it."""
        layer = sum(math.prod(s) for s in self._layer_shapes().values())
        return sum(math.prod(s) for s in self._outer_shapes().values()) + (
            self.num_hidden_layers * layer
        )

    # ----- JSON -----------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, allow_hf_keys: bool = False) -> OctoConfig:
        """Build from a dict. Unknown keys raise (naming the nearest field), unless allow_hf_keys,
        which ignores the other keys of a transformers config.json (architectures, dtype...)."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in d if k not in names]
        if unknown and not allow_hf_keys:
            k = unknown[0]
            near = nearest_key(k, names)
            hint = f"; did you mean {near!r}?" if near else f"; valid keys: {', '.join(names)}"
            raise ValueError(f"OctoConfig: unknown key {k!r}{hint}")
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json_file(cls, path: str | Path) -> OctoConfig:
        """Read a model config JSON: ours, or a transformers Llama config.json."""
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"model config {path} does not exist") from None
        except UnicodeDecodeError as e:
            raise ValueError(
                f"model config {path} is not UTF-8 text ({e}); save it as UTF-8"
            ) from None
        except json.JSONDecodeError as e:
            raise ValueError(f"model config {path} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ValueError(f"model config {path} must hold a JSON object")
        is_hf = "model_type" in d or "architectures" in d
        if is_hf and d.get("model_type", "llama") != "llama":
            raise ValueError(f"{path}: model_type {d['model_type']!r} is not a Llama model")
        if is_hf:
            d = _from_hf_dict(d, path)
        return cls.from_dict(d, allow_hf_keys=is_hf)

    def to_json_file(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def to_hf_dict(
        self,
        dtype: str = "float32",
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
    ) -> dict[str, Any]:
        """A transformers LlamaConfig config.json for this shape; dtype names the stored tensors'.

        Written so that transformers 4.x (torch_dtype, rope_theta) and 5.x (dtype,
        rope_parameters) both read it. The token ids are the tokenizer's, given by whoever saves
        the model with one (so transformers' generate stops at end-of-text); null without, since
        LlamaConfig's defaults (bos 1, eos 2) would be wrong for most tokenizers.
        """
        d = self.to_dict()
        d.update(
            architectures=["LlamaForCausalLM"],
            model_type="llama",
            hidden_act="silu",
            head_dim=self.head_dim,
            mlp_bias=False,
            attention_dropout=0.0,
            rope_scaling=None,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            pretraining_tp=1,
            use_cache=True,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=None,
            torch_dtype=dtype,
            dtype=dtype,
        )
        return d

    # ----- presets ----------------------------------------------------------------------------

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> OctoConfig:
        """Named shapes: "seed" (the seed's example, 127M params at vocab 16000), "tiny" (tests)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


def _from_hf_dict(d: dict[str, Any], path: Path) -> dict[str, Any]:
    """Octo's fields from a transformers Llama config.json (4.x or 5.x spelling). Refuses Llama
    variants Octo does not implement, rather than load them wrongly."""
    d = dict(d)
    if "auto_map" in d:  # transformers would import the named Python files with remote code on
        raise ValueError(
            f"{path} has an 'auto_map' (custom model code); Octo never runs code from a model "
            "folder and loads plain Llama models only: remove the key or use another model"
        )
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
    ):
        if key not in d:
            raise ValueError(f"{path}: Llama config has no {key!r}")
    # transformers 5 keeps rope_theta (and any scaling) in rope_parameters
    rope = d.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ValueError(f"{path}: rope_parameters {rope!r} is not an object")
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"{path}: rope_type {rope['rope_type']!r} is not supported by Octo")
    if "rope_theta" in rope:
        d["rope_theta"] = rope["rope_theta"]
    if d.get("rope_scaling") not in (None, {}):
        raise ValueError(f"{path}: rope_scaling {d['rope_scaling']!r} is not supported by Octo")
    if d.get("num_key_value_heads") is None:  # Llama's default: one KV head per query head
        d["num_key_value_heads"] = d["num_attention_heads"]
    if d.get("mlp_bias"):
        raise ValueError(f"{path}: mlp_bias=true is not supported by Octo")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{path}: hidden_act {d['hidden_act']!r} is not supported (only silu)")
    hd = d.get("head_dim")
    if hd is not None and hd * d["num_attention_heads"] != d["hidden_size"]:
        raise ValueError(
            f"{path}: head_dim {hd} != hidden_size / num_attention_heads "
            f"({d['hidden_size']} / {d['num_attention_heads']}); Octo needs them equal"
        )
    return d


PRESETS: dict[str, dict[str, Any]] = {
    "seed": dict(
        vocab_size=16000,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=3,
        max_position_embeddings=4096,
    ),
    "tiny": dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    ),
}
