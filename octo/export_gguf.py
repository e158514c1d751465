"""Export a model folder to one GGUF file that llama.cpp runs:

    python -m octo.export_gguf FOLDER OUT.gguf [--dtype f16|bf16|f32] [--force]

FOLDER is a final model or a training checkpoint (config.json + safetensors + tokenizer files).
The file is written with the `gguf` package (ggml's own reader/writer, `pip install gguf`), for
llama.cpp's "llama" architecture:

    metadata   llama.context_length, .embedding_length, .block_count, .feed_forward_length,
               .attention.head_count(_kv), .rope.freq_base, .rope.dimension_count,
               .attention.layer_norm_rms_epsilon, .vocab_size; general.name, .file_type
    tensors    token_embd, output_norm, output (absent when tied: llama.cpp reuses token_embd),
               blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate,
               ffn_up, ffn_down}; names from gguf's own Llama name map
    tokenizer  tokenizer.ggml.model "gpt2" (byte-level BPE), .pre "gpt-2", tokens, scores, token
               types, merges, bos/eos/padding ids, whether BOS/EOS are added

Why Q and K are permuted: transformers' Llama (and Octo, octo_kernels.apply_rope) rotates pairs
(i, i + D/2) of each head ("rotate half"); llama.cpp's llama architecture rotates adjacent pairs
(2i, 2i + 1). Reordering the rows of q_proj and k_proj within each head, row i -> 2i and row
D/2 + i -> 2i + 1, makes llama.cpp's rotation act on the same pairs; attention scores are dot
products over the head, so the reorder changes nothing else. `to_gguf_qk` does it (per head of
q: n_head, of k: n_kv_head), `from_gguf_qk` undoes it.

Why the pre-tokenizer is checked here, not hashed: llama.cpp's own converter identifies a BPE
pre-tokenizer by hashing the ids of a test string against known models, so a tokenizer trained by
`python -m train.tokenizer` is "not recognized" although it is GPT-2's byte-level one. This
exporter reads what the tokenizer does (tokenizer.json: no normalizer, a ByteLevel
pre-tokenizer with GPT-2's regex and no prefix space, a plain BPE model) and writes the tag
llama.cpp implements for exactly that; anything else is refused in one line naming it.

Precision: f16 (default, as llama.cpp's converter) or bf16 store the 2-D weights in that dtype;
norms (1-D) and biases stay f32, as llama.cpp expects; f32 stores everything as trained.
Every problem is one line on stderr and exit status 2; OUT is written beside itself and renamed
into place, so a failure leaves no partial file and an existing OUT is replaced only with --force.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from octo.files import write_atomic
from octo.generate import load_model
from octo.tokenizer_files import load_local_tokenizer

DTYPES = ("f16", "bf16", "f32")
GPT2_PRE = "gpt-2"  # llama.cpp's tokenizer.ggml.pre tag for GPT-2's byte-level pre-tokenizer


def to_gguf_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """q_proj / k_proj weight (n_head * D, C) or bias (n_head * D,) from transformers' rotate-half
    row order to llama.cpp's interleaved one: within each head, row i -> 2i, row D/2 + i -> 2i + 1
    (module docstring)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def from_gguf_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of to_gguf_qk: llama.cpp's interleaved rows back to rotate-half order."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ----- tokenizer ----------------------------------------------------------------------------------


@dataclass
class GGUFVocab:
    """What llama.cpp's "gpt2" (byte-level BPE) tokenizer reads. tokens[i] is id i's byte-level
    string (GPT-2's bytes-to-unicode alphabet, as in tokenizer.json); ids the tokenizer does not
    have (the model's vocab is rounded up, e.g. 50257 -> 50304) are "[PAD<i>]", type UNUSED."""

    tokens: list[str]
    types: list[int]  # gguf.TokenType: NORMAL, CONTROL (special), USER_DEFINED, UNUSED
    merges: list[str]  # "left right", in rank order
    pre: str = GPT2_PRE
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad (when set)
    add_bos: bool = False
    add_eos: bool = False


def _describe(component: dict[str, Any] | None) -> str:
    """A tokenizer.json component as a short name: "ByteLevel(add_prefix_space=true)",
    "Sequence[Split, ByteLevel]", "NFC"."""
    if component is None:
        return "none"
    kind = component.get("type", "?")
    inner = component.get("pretokenizers") or component.get("normalizers")
    if inner:
        return f"{kind}[{', '.join(_describe(c) for c in inner)}]"
    return kind


def check_byte_level_bpe(spec: dict[str, Any], where: str) -> None:
    """ValueError (one line, naming the part) unless the tokenizer.json `spec` is a GPT-2 style
    byte-level BPE, the one tokenizer llama.cpp's "gpt-2" pre-tokenizer reproduces exactly."""
    model = spec.get("model") or {}
    fix = ("; GGUF export supports byte-level BPE tokenizers like gpt2's and those "
           "`python -m train.tokenizer` trains")  # fmt: skip
    if model.get("type") != "BPE":
        raise ValueError(
            f"the tokenizer in {where} is a {model.get('type', '?')} model, not BPE{fix}"
        )
    if spec.get("normalizer") is not None:
        raise ValueError(
            f"the tokenizer in {where} has normalizer {_describe(spec['normalizer'])}, which "
            f"llama.cpp's GPT-2 pre-tokenizer does not apply{fix}"
        )
    pre = spec.get("pre_tokenizer")
    gpt2_like = (
        pre is not None
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
        and not pre.get("add_prefix_space", False)
    )
    if not gpt2_like:
        name = _describe(pre)
        if pre is not None and pre.get("type") == "ByteLevel":
            name = (f"ByteLevel(add_prefix_space={str(pre.get('add_prefix_space')).lower()}, "
                    f"use_regex={str(pre.get('use_regex', True)).lower()})")  # fmt: skip
        raise ValueError(
            f"the tokenizer in {where} has pre-tokenizer {name}, which has no llama.cpp "
            f"equivalent this exporter can name (llama.cpp's 'gpt-2' is ByteLevel with GPT-2's "
            f"regex and no prefix space){fix}"
        )
    for key, ok in (("byte_fallback", False), ("ignore_merges", False), ("dropout", None)):
        if model.get(key, ok) not in (ok, None, 0):
            raise ValueError(f"the tokenizer in {where} has BPE {key}={model[key]!r}{fix}")
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise ValueError(f"the tokenizer in {where} has BPE {key}={model[key]!r}{fix}")


def gguf_vocab(tokenizer: Any, vocab_size: int, where: str) -> GGUFVocab:
    """GGUFVocab of a transformers fast tokenizer (its tokenizer.json, read through
    backend_tokenizer), padded to the model's vocab_size; ValueError when it is not a byte-level
    BPE (check_byte_level_bpe) or holds more tokens than the model."""
    import gguf  # lazy: an optional extra (pip install gguf)

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"the tokenizer in {where} is not a fast (tokenizer.json) tokenizer; "
                         "re-save it with transformers' fast tokenizer")  # fmt: skip
    spec = json.loads(backend.to_str())
    check_byte_level_bpe(spec, where)
    by_id: dict[int, str] = {i: t for t, i in spec["model"]["vocab"].items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    by_id.update({i: a["content"] for i, a in added.items()})
    if max(by_id) >= vocab_size:
        raise ValueError(
            f"the tokenizer in {where} has token id {max(by_id)} but the model's vocab_size is "
            f"{vocab_size}; export the tokenizer the model was trained with"
        )
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i].get("special")
                         else gguf.TokenType.USER_DEFINED)  # fmt: skip
        else:
            types.append(gguf.TokenType.NORMAL)
    # tokenizers >= 0.20 stores a merge as [left, right], older ones as "left right"
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    ids = {
        name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "unk", "pad")
    }
    with_special = tokenizer.encode("a")
    plain = tokenizer.encode("a", add_special_tokens=False)
    extra = len(with_special) - len(plain)
    return GGUFVocab(
        tokens=tokens,
        types=[int(t) for t in types],
        merges=merges,
        special_ids={k: v for k, v in ids.items() if v is not None},
        add_bos=extra > 0 and with_special[0] == ids["bos"] and ids["bos"] is not None,
        add_eos=extra > 0 and with_special[-1] == ids["eos"] and ids["eos"] is not None,
    )


# ----- the file -----------------------------------------------------------------------------------


def _gguf_name(folder: Path) -> str:
    """general.name: the run's folder for `.../demo/final` or `.../checkpoint_step_N`."""
    folder = folder.resolve()
    if folder.name == "final" or folder.name.startswith("checkpoint_step_"):
        return f"{folder.parent.name}-{folder.name}"
    return folder.name


def _check_folder(folder: Path) -> None:
    """One line for a FOLDER that is no model folder, naming one that is when FOLDER holds them
    (a checkpoint_dir)."""
    if folder.is_file():
        raise ValueError(f"{folder} is a file; pass the model folder (config.json + safetensors)")
    if not folder.is_dir():
        raise ValueError(f"model folder {folder} does not exist")
    if (folder / "config.json").is_file():
        return
    inside = sorted(p.parent for p in folder.glob("*/config.json"))
    hint = f"; pass a model folder inside it, e.g. {inside[-1]}" if inside else ""
    raise ValueError(f"{folder} has no config.json: it is not a model folder{hint}")


def check_out_path(out: Path, force: bool) -> None:
    if out.is_dir():
        raise ValueError(f"OUT {out} is a folder; name the .gguf file to write")
    if out.exists() and not force:
        raise ValueError(f"{out} exists; pass --force to replace it, or name another file")


def export_gguf(
    folder: str | Path, out: str | Path, dtype: str = "f16", force: bool = False
) -> Path:
    """Write FOLDER's model and tokenizer to OUT as a llama.cpp GGUF file (module docstring).
    Returns OUT. ValueError (one line) for a bad folder, tokenizer, dtype or OUT."""
    import gguf  # lazy: an optional extra (pip install gguf); main names it when absent

    folder, out = Path(folder), Path(out)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    check_out_path(out, force)
    _check_folder(folder)
    model = load_model(folder, torch.device("cpu"))
    cfg = model.config
    tokenizer = load_local_tokenizer(folder, "; GGUF files carry their tokenizer")
    vocab = gguf_vocab(tokenizer, cfg.vocab_size, str(folder))

    qtype = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
             "f32": gguf.GGMLQuantizationType.F32}[dtype]  # fmt: skip
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                 "f32": gguf.LlamaFileType.ALL_F32}[dtype]  # fmt: skip
    arch = gguf.MODEL_ARCH.LLAMA
    w = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[arch])
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(_gguf_name(folder))
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    # llama.cpp reads scores only for SentencePiece vocabularies; a BPE's ranks are its merges
    w.add_token_scores([0.0] * len(vocab.tokens))
    w.add_token_types(vocab.types)
    w.add_token_merges(vocab.merges)
    for name, token_id in vocab.special_ids.items():
        getattr(w, f"add_{name}_token_id")(token_id)
    w.add_add_bos_token(vocab.add_bos)
    w.add_add_eos_token(vocab.add_eos)

    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    state = model.state_dict()
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight")  # llama.cpp uses token_embd when output is absent
    for hf_name, t in state.items():
        t = t.detach().float()
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            t = to_gguf_qk(t, cfg.num_attention_heads)
        elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            t = to_gguf_qk(t, cfg.num_key_value_heads)
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"{folder}: tensor {hf_name} has no llama.cpp name")
        # norms and biases (1-D) stay f32: llama.cpp's kernels for them expect it
        kind = qtype if t.dim() == 2 else gguf.GGMLQuantizationType.F32
        w.add_tensor(name, gguf.quants.quantize(t.numpy(), kind), raw_dtype=kind)
    del model, state
    out.parent.mkdir(parents=True, exist_ok=True)
    # beside OUT, then renamed over it: OUT is the old file or the whole new one
    write_atomic(out, lambda tmp: _write_file(w, tmp))
    return out


def _write_file(w: Any, path: Path) -> None:
    """The GGUFWriter's whole file (header, metadata, tensors) to path."""
    w.write_header_to_file(path=path)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ----- python -m octo.export_gguf -----------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m octo.export_gguf",
        description="Write a model folder (final model or checkpoint) as a llama.cpp GGUF file.",
    )
    p.add_argument("folder", help="model folder: config.json, safetensors and tokenizer files")
    p.add_argument("out", help="the .gguf file to write")
    p.add_argument("--dtype", default="f16", help="f16 (default), bf16 or f32 for the 2-D weights")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    return p


def main(argv: list[str] | None = None) -> int:
    """Export; errors are one line on stderr and exit status 2."""
    args = _parser().parse_args(argv)
    try:
        try:
            import gguf  # noqa: F401  (lazy: an optional extra; its absence is one line)
        except ImportError:
            raise ValueError(
                "GGUF export needs the gguf package: pip install gguf (or pip install "
                "'octo-trainer[gguf]')"
            ) from None
        out = export_gguf(args.folder, args.out, args.dtype, args.force)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: writing {args.out} failed ({e.strerror or e}); free disk space or name "
              "another place", file=sys.stderr)  # fmt: skip
        return 2
    size = out.stat().st_size / 2**20
    print(f"wrote {out} ({size:.1f} MiB, {args.dtype}); run it with llama.cpp: "
          f"llama-completion -m {out} -no-cnv -p \"Once upon a time\" -n 64")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
