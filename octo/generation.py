"""Sampling for OctoForCausalLM.generate, and the command line:

    python -m octo.generate --checkpoint DIR --prompt "Once upon a time" [--tokenizer DIR]

prints the prompt and its continuation, decoded with the tokenizer saved in DIR.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from octo.integrity import read_marker, verify_marked


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """ValueError naming the bad argument. NaN passes a plain `< 0` test and then fails deep in
    torch.multinomial, and an infinite temperature samples uniformly: both are refused here."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 or None: no top-k filter), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 or None: no nucleus filter), got {top_p}")


def sample_next(
    logits: torch.Tensor,  # (B, V) fp32
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:  # (B,) int64
    """Pick the next token: greedy at temperature 0, else sample from the tempered distribution
    restricted to the top_k tokens and the smallest set whose probability reaches top_p."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first always stays)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


# ----- python -m octo.generate -------------------------------------------------------------------

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
# the JSON files AutoTokenizer may read (config.json: for the tokenizer class when
# tokenizer_config.json does not name one); a checkpoint's other JSON files are not its business
TOKENIZER_JSON = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "config.json",
)
# the files a tokenizer's vocabulary is read from: tokenizer.json (fast), or a slow tokenizer's
VOCAB_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model", "spiece.model")
# every file a tokenizer folder may hold that the loader reads: checked against a completion
# marker when the folder has one (octo/integrity.py)
TOKENIZER_NAMES = frozenset(
    TOKENIZER_FILES + TOKENIZER_JSON + VOCAB_FILES + ("merges.txt", "chat_template.jinja")
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m octo.generate",
        description="Continue a prompt with a saved Octo (or Llama) checkpoint.",
    )
    p.add_argument("--checkpoint", required=True, help="folder with config.json + safetensors")
    p.add_argument("--prompt", required=True)
    p.add_argument("--tokenizer", help="tokenizer folder (default: the one saved in --checkpoint)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 = no top-k filter")
    p.add_argument("--top-p", type=float, default=0.95, help="1 = no nucleus filter")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    return p


def load_local_tokenizer(directory: str | Path, hint: str = ""):
    """AutoTokenizer from a local folder, never the Hub, never running the folder's code (an
    auto_map is refused, see octo.tokenizer_files); ValueError (with `hint` appended) when
    the folder holds no tokenizer or one that does not load. transformers raises whatever its
    readers raise (JSONDecodeError without a file name, OSError, KeyError, ...), so the folder's
    completion marker (when it has one) is checked for the tokenizer's files, a missing
    vocabulary is named, its JSON files are parsed first to name a broken one, and any other
    failure is reported with the folder."""
    from octo.tokenizer_files import check_no_remote_code

    directory = Path(directory)
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(
            f"no tokenizer in {directory} (none of {', '.join(TOKENIZER_FILES)}){hint}"
        )
    try:  # a checkpoint or final folder has a completion marker: its files are checked
        marker = read_marker(directory)
        if marker is not None:
            verify_marked(directory, [n for n in marker["files"] if n in TOKENIZER_NAMES])
    except ValueError as e:
        raise ValueError(f"{e}; restore the folder{hint}") from None
    if not any((directory / name).is_file() for name in VOCAB_FILES):
        # transformers would try to convert a slow tokenizer and ask for sentencepiece or
        # tiktoken, or build a tokenizer of one token
        raise ValueError(
            f"{directory / 'tokenizer.json'} is missing: {directory} has a tokenizer config but "
            f"no vocabulary ({', '.join(VOCAB_FILES)}); copy the tokenizer's files back{hint}"
        )
    for path in [directory / name for name in TOKENIZER_JSON if (directory / name).is_file()]:
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ValueError(
                f"{path} does not read as JSON ({e}); restore or re-save it{hint}"
            ) from None
    check_no_remote_code(directory)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            str(directory), local_files_only=True, trust_remote_code=False
        )
    except Exception as e:  # a third-party loader: whatever it raises means a bad folder
        raise ValueError(
            f"the tokenizer in {directory} does not load ({type(e).__name__}: {e}); its files are "
            f"damaged or not a transformers tokenizer: re-save it{hint}"
        ) from None


def resolve_device(name: str | None) -> torch.device:
    """--device -> torch.device, checked before anything loads (torch's own errors are a
    RuntimeError listing every device type, or an AssertionError without CUDA)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r} is not a device here; use cpu, cuda or cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {name} asked for, but CUDA is not available; use cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {name}: there are {count} CUDA device(s), cuda:0 to "
                             f"cuda:{count - 1}")  # fmt: skip
    return device


def load_model(directory: str | Path, device: torch.device):
    """OctoForCausalLM from a checkpoint folder, as one ValueError naming the folder when it
    cannot be read, and when a weight is NaN or infinite (a run that diverged saves such weights;
    sampling from them fails deep in torch.multinomial)."""
    from octo.model import OctoForCausalLM

    directory = Path(directory)
    if directory.is_file():
        raise ValueError(
            f"--checkpoint {directory} is a file; pass the checkpoint folder that holds "
            f"config.json and the safetensors (e.g. {directory.parent})"
        )
    if not directory.is_dir():
        raise ValueError(f"checkpoint folder {directory} does not exist")
    try:
        model = OctoForCausalLM.from_pretrained(directory, device=device)
    except (OSError, RuntimeError) as e:
        raise ValueError(
            f"could not load the model in {directory} ({type(e).__name__}: {e}); check that its "
            "files are readable and complete (or, out of GPU memory, use --device cpu)"
        ) from None
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(
                f"the checkpoint {directory}'s weights are not finite ({name} holds NaN or inf): "
                "the run that saved it diverged; use an earlier checkpoint"
            )
    return model


def main(argv: list[str] | None = None) -> int:
    """Print the prompt and its continuation. Errors are one line on stderr, exit status 2."""
    args = _parser().parse_args(argv)
    try:
        # Every argument is checked before the model loads, so a typo costs no loading time.
        device = resolve_device(args.device)
        check_sampling(args.temperature, args.top_k, args.top_p)
        if args.max_new_tokens < 0:
            raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
        model = load_model(args.checkpoint, device)
        if args.tokenizer:
            tokenizer = load_local_tokenizer(args.tokenizer, "; or pass another --tokenizer DIR")
        else:
            tokenizer = load_local_tokenizer(
                args.checkpoint,
                "; pass --tokenizer DIR with the tokenizer the model was trained on",
            )
        if len(tokenizer) > model.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                f"{model.config.vocab_size}; use the tokenizer the model was trained with"
            )
        ids = tokenizer(args.prompt, return_tensors="pt").input_ids.to(device)  # (1, T0)
        if ids.shape[1] == 0:
            raise ValueError("the prompt is empty after tokenization; give a non-empty --prompt")
        generator = torch.Generator(device=device).manual_seed(args.seed)
        out = model.generate(
            ids,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k or None,
            top_p=args.top_p,
            eos_token_id=tokenizer.eos_token_id,
            generator=generator,
        )  # (1, T0 + n)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(tokenizer.decode(out[0].tolist(), skip_special_tokens=True))
    return 0
