"""The command line that continues a prompt with a saved model:

    python -m octo.generate --checkpoint DIR --prompt "Once upon a time" [--tokenizer DIR]
        [--max-new-tokens 64] [--temperature 0.8] [--top-k 50] [--top-p 0.95] [--seed 0]
        [--device cpu|cuda|cuda:N]

prints the prompt and its continuation, decoded with the tokenizer saved in DIR (a final model
or a training checkpoint; any transformers Llama folder with safetensors). Every argument is
checked before the model loads (octo.device, octo.sampling), the folder's completion marker and
files before its tensors are used (octo.hf_io, octo.tokenizer_files); every problem is one line
on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from octo.device import NO_CUDA, NO_SUCH_GPU, DeviceError, resolve_device
from octo.model import OctoForCausalLM
from octo.sampling import check_sampling
from octo.tokenizer_files import load_local_tokenizer


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


def device_message(e: DeviceError) -> str:
    """The --device flag's words for octo.device's DeviceError."""
    if e.problem == NO_CUDA:
        return f"--device {e.name} asked for, but CUDA is not available; use cpu"
    if e.problem == NO_SUCH_GPU:
        return (f"--device {e.name}: there are {e.count} CUDA device(s), cuda:0 to "
                f"cuda:{e.count - 1}")  # fmt: skip
    return f"--device {e.name!r} is not a device here; use cpu, cuda or cuda:N"


def load_model(directory: str | Path, device: torch.device) -> OctoForCausalLM:
    """OctoForCausalLM from a checkpoint folder, as one ValueError naming the folder when it
    cannot be read, and when a weight is NaN or infinite (a run that diverged saves such weights;
    sampling from them fails deep in torch.multinomial)."""
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
        try:
            device = resolve_device(args.device)
        except DeviceError as e:
            raise ValueError(device_message(e)) from None
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


if __name__ == "__main__":
    raise SystemExit(main())
