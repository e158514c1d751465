"""End-to-end training throughput: Octo against transformers' Llama in the same loop.

    python -m bench.train_throughput [--out results.json] [--steps 20] [--preset auto|seed|tiny]

Every provider runs the real `train.loop.Trainer.train_step` (gradient accumulation, clipping,
AdamW, the schedule) on synthetic tokens, side by side in one process:
    octo-triton-compiled   Octo, Triton kernels, torch.compile (the default on a GPU)
    octo-reference-eager   Octo, pure-PyTorch reference kernels, no compile
    octo-reference-compiled, octo-triton-cudagraphs, octo-triton-graph   (on request:
                           --providers) Octo with the reference kernels under torch.compile;
                           Octo with compile=cudagraphs (Inductor's CUDA graphs); Octo with
                           compile=graph (each micro-batch captured as one CUDA graph; named
                           "... (capture failed)" when it ran uncaptured)
    hf-llama-eager         transformers' LlamaForCausalLM (attn_implementation="sdpa"), same
                           weights shape, optimizer and precision, loss through its own loss path
    hf-llama-compiled      the same, torch.compile'd (graph breaks allowed), where it compiles
    <any octo provider>-muon   (on request) the same with optimizer muon (train/muon.py): the
                           step-time cost of Muon beside AdamW, in the same run
On a GPU: the seed config (block 512, batch 16, accumulation 4, bf16) at vocab 16000 and 50304.
On a CPU: the tiny config in fp32 (block 128, batch 8, accumulation 2).

Reported per provider: tokens/s, MFU (6N + attention flops over the GPU's bf16 peak), peak memory,
first-step time (compile included), where a step's time goes (data wait, forward+backward,
optimizer) from extra profiled steps (those sync per phase; the throughput steps do not), and on
a GPU how long the GPU itself worked during one more step (torch.profiler: kernels, copies; a
step far longer than that is bound by the host, not the GPU).
With OCTO_TRITON_OP=1 in the environment (octo_kernels.backend) the octo-triton providers are named
"... +triton_op".
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Iterator

import torch
from torch import nn

from bench.common import device_busy_ms, env_info
from octo import CausalLMOutput, OctoConfig, OctoForCausalLM
from octo_kernels.backend import INLINE_TRITON
from train.config import TrainConfig
from train.loop import Trainer
from train.metrics import gpu_peak_flops
from train.runtime import seed_everything

GPU_SHAPE = dict(block_size=512, batch_size=16, gradient_accumulation_steps=4)
CPU_SHAPE = dict(block_size=128, batch_size=8, gradient_accumulation_steps=2)
GRAPH_COUNTS = ("captures", "replays", "failure")  # compile=graph's record, in the JSON


class HFLlamaAdapter(nn.Module):
    """transformers' LlamaForCausalLM behind Octo's forward signature, so the Trainer drives it
    unchanged. The loss is transformers' own: with num_items_in_batch=1 its causal-LM loss returns
    the token sum, which is what the Trainer's reduction="sum" asks for."""

    def __init__(self, cfg: OctoConfig, compiled: bool = False) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        hf_cfg = LlamaConfig(**cfg.to_hf_dict(), attn_implementation="sdpa")
        self.hf = LlamaForCausalLM(hf_cfg)
        self.config = cfg  # the Trainer reads layer count and hidden size for its flop count
        self._forward = torch.compile(self.hf) if compiled else self.hf

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.hf.parameters())  # untied: lm_head counted once
        return n - (self.hf.model.embed_tokens.weight.numel() if exclude_embeddings else 0)

    def forward(self, input_ids, labels=None, reduction="mean") -> CausalLMOutput:
        n = 1 if reduction == "sum" else None
        out = self._forward(input_ids=input_ids, labels=labels, num_items_in_batch=n)
        return CausalLMOutput(loss=out.loss.float(), logits=None)


def _batches(cfg: TrainConfig, vocab: int, device: torch.device) -> Iterator[torch.Tensor]:
    """Endless synthetic micro-batches (B, T) from a pool of 8 random ones (pinned on CUDA), so the
    data wait is the loop's own cost, not a tokenizer's."""
    g = torch.Generator().manual_seed(0)
    pool = [
        torch.randint(0, vocab, (cfg.batch_size, cfg.block_size), generator=g) for _ in range(8)
    ]
    if device.type == "cuda":
        pool = [b.pin_memory() for b in pool]
    i = 0
    while True:
        yield pool[i % len(pool)]
        i += 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_provider(
    provider: str, model_cfg: OctoConfig, shape: dict, device: torch.device, steps: int,
    profiled_steps: int,
) -> dict:  # fmt: skip
    """Build a Trainer for `provider`, time its steps, return the measurements."""
    octo = provider.startswith("octo")
    base = provider.removesuffix("-muon")
    graph_mode = next((m for m in ("cudagraphs", "graph") if base.endswith(f"-{m}")), None)
    compiled = base.endswith("compiled") or graph_mode is not None
    precision = "bf16" if device.type == "cuda" else "fp32"
    cfg = TrainConfig(
        **shape, precision=precision, device=str(device), max_steps=10_000, warmup_steps=10,
        optimizer="muon" if base != provider else "adamw",
        compile=(graph_mode or "on") if (octo and compiled) else "off",
        kernels="triton" if provider.startswith("octo-triton") else "torch" if octo else "auto",
        log_dir="/tmp/octo-bench-logs",
    )  # fmt: skip
    model = None
    if not octo:  # transformers' Llama starts from the weights Octo's Trainer would draw
        model = HFLlamaAdapter(model_cfg, compiled=compiled)
        seed_everything(cfg.seed)
        model.hf.load_state_dict(OctoForCausalLM(model_cfg).state_dict())
    torch.manual_seed(0)
    trainer = Trainer(cfg, model_cfg, model=model, device=device)
    data = _batches(cfg, model_cfg.vocab_size, device)
    accum = cfg.gradient_accumulation_steps

    losses = []  # (device tensors) the first steps' mean losses: providers must agree

    def step(profile: bool = False) -> tuple[float, dict | None]:
        t0 = time.perf_counter()
        micro = [next(data) for _ in range(accum)]
        wait = time.perf_counter() - t0
        trainer.profile = profile
        stats = trainer.train_step(micro)
        if len(losses) < 5:
            losses.append(stats.loss_sum / stats.n_targets)
        return wait, stats.timings

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    step()
    _sync(device)
    first_step_s = time.perf_counter() - t0
    for _ in range(2):  # settle (recompiles, allocator, autotuning) before timing
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    elapsed = time.perf_counter() - t0
    phases = {"data_wait": 0.0, "forward_backward": 0.0, "optimizer": 0.0}
    for _ in range(profiled_steps):
        wait, timings = step(profile=True)
        phases["data_wait"] += wait
        for k in ("forward_backward", "optimizer"):
            phases[k] += timings[k]
    gpu_busy_ms = None
    if device.type == "cuda":
        try:
            gpu_busy_ms = device_busy_ms(step, device)
        except Exception as e:  # a profiler that cannot trace here must not lose the run
            print(f"{provider}: GPU busy time not measured: {type(e).__name__}: {e}")
    tokens_per_step = cfg.batch_size * cfg.block_size * accum
    tok_s = steps * tokens_per_step / elapsed
    peak = gpu_peak_flops(device) if device.type == "cuda" else None
    if provider.startswith("octo-triton") and INLINE_TRITON:
        provider += " +triton_op"
    graph = trainer._graph  # compile=graph: did the capture happen? (the Trainer printed why not)
    if graph is not None and graph.failure is not None:
        provider += " (capture failed)"
    counts = None if graph is None else {k: getattr(graph, k) for k in GRAPH_COUNTS}
    result = {
        "provider": provider,
        "vocab_size": model_cfg.vocab_size,
        "params": sum(p.numel() for p in trainer.model.parameters()),
        "tokens_per_step": tokens_per_step,
        "step_ms": 1e3 * elapsed / steps,
        "tokens_per_s": tok_s,
        "mfu": tok_s * trainer._flops_per_token() / peak if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda"
        else None,
        "first_step_s": first_step_s,
        "phase_ms": {k: 1e3 * v / max(profiled_steps, 1) for k, v in phases.items()},
        "gpu_busy_ms": gpu_busy_ms,
        "first_losses": [float(x) for x in losses],
        "kernels": cfg.kernels,
        "compile": compiled,
        "graph": counts,
        "precision": precision,
    }
    return result


def release(device: torch.device) -> None:
    """Free the last provider's model, optimizer and compiled graphs before the next one."""
    torch._dynamo.reset()  # first: the compiled graphs (and a CUDA-graph pool) hold memory
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def markdown(results: list[dict], env: dict) -> str:
    """A table per vocab size, with ratios against transformers' eager Llama."""
    out = [
        f"Hardware: {env.get('gpu') or env.get('cpu')}; torch {env['torch']}, Triton "
        f"{env['triton']}, commit {env['commit']}, {env['date']}.",
        "",
    ]
    for vocab in sorted({r["vocab_size"] for r in results}):
        rows = [r for r in results if r["vocab_size"] == vocab]
        base = next((r for r in rows if r["provider"] == "hf-llama-eager"), None)
        out += [
            f"vocab {vocab}, {rows[0]['tokens_per_step']} tokens/step, {rows[0]['precision']}:",
            "",
            "| provider | tokens/s | vs HF | MFU | peak mem GiB | vs HF | step ms | data / fwd+bwd"
            " / optim ms | GPU busy ms | first step s |",
            "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|",
        ]
        for r in rows:
            speed = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else ""
            mem = r["peak_memory_gib"]
            mem_ratio = f"{mem / base['peak_memory_gib']:.2f}x" if base and mem else ""
            ph = r["phase_ms"]
            mfu = "" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            mem_s = "" if mem is None else f"{mem:.2f}"
            busy = r.get("gpu_busy_ms")  # absent in JSONs written before 2026-12-06
            busy_s = "" if busy is None else f"{busy:.1f}"
            out.append(
                f"| {r['provider']} | {r['tokens_per_s']:,.0f} | {speed} | {mfu} | "
                f"{mem_s} | {mem_ratio} | {r['step_ms']:.1f} | "
                f"{ph['data_wait']:.2f} / {ph['forward_backward']:.1f} / {ph['optimizer']:.1f} | "
                f"{busy_s} | {r['first_step_s']:.1f} |"
            )
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per provider")
    ap.add_argument("--preset", default="auto", choices=["auto", "seed", "tiny"])
    ap.add_argument("--providers", default=None, help="comma-separated subset")
    ap.add_argument("--vocabs", default=None, help="comma-separated (GPU default: 16000,50304)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = args.preset if args.preset != "auto" else ("seed" if device.type == "cuda" else "tiny")
    if device.type == "cuda":
        vocabs, shape, steps, profiled = [16000, 50304], GPU_SHAPE, args.steps or 20, 5
        providers = ["octo-triton-compiled", "octo-reference-eager",
                     "hf-llama-eager", "hf-llama-compiled"]  # fmt: skip
    else:
        vocabs, shape, steps, profiled = [256], CPU_SHAPE, args.steps or 10, 3
        providers = ["octo-reference-compiled", "octo-reference-eager", "hf-llama-eager"]
    if args.providers:
        providers = args.providers.split(",")
    if args.vocabs:
        vocabs = [int(v) for v in args.vocabs.split(",")]
    env = env_info()
    results = []
    if device.type == "cuda":  # start the profiler once before any CUDA graph exists: one
        # captured first and profiled later could fault or hang it (pytorch#75504, #100441)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]):
            pass
    if device.type == "cpu":  # the process's first provider ran ~1.5x slower than when repeated;
        # an untimed eager pass warms the process up (an eager one: no compile cache to reuse)
        run_provider("octo-reference-eager", OctoConfig.preset(preset, vocab_size=vocabs[0]),
                     shape, device, 2, 0)  # fmt: skip
        release(device)
    for vocab in vocabs:
        model_cfg = OctoConfig.preset(preset, vocab_size=vocab)
        for provider in providers:
            try:
                r = run_provider(provider, model_cfg, shape, device, steps, profiled)
                release(device)
            except Exception as e:  # one provider failing must not hide the others' numbers
                print(f"{provider} @ vocab {vocab}: FAILED: {type(e).__name__}: {e}")
                results.append({"provider": provider, "vocab_size": vocab, "error": str(e)})
                continue
            print(
                f"{r['provider']} @ vocab {vocab}: {r['tokens_per_s']:,.0f} tok/s, "
                f"step {r['step_ms']:.1f} ms, first step {r['first_step_s']:.1f} s"
                + (f", peak {r['peak_memory_gib']:.2f} GiB" if r["peak_memory_gib"] else "")
                + (f", MFU {100 * r['mfu']:.1f}%" if r["mfu"] else "")
            )
            results.append(r)
            if args.out:  # after every provider, so a run cut short still leaves its numbers
                with open(args.out, "w") as f:
                    json.dump({"env": env, "results": results}, f, indent=2)
    ok = [r for r in results if "error" not in r]
    for r in ok:  # same seed, same tokens: every provider's first losses should agree
        print(f"first losses {r['provider']} @ {r['vocab_size']}: "
              + " ".join(f"{x:.5f}" for x in r["first_losses"]))  # fmt: skip
    md = markdown(ok, env)
    print(md)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"env": env, "results": results, "markdown": md}, f, indent=2)
    return 0 if len(ok) == len(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
