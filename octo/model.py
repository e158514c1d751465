"""The Octo model: a Llama-architecture decoder as a plain nn.Module.

Dimension legend:
    B  batch            T  tokens in this call       P  cached + new positions (KV cache)
    C  hidden_size      H  query heads               K  key/value heads (H % K == 0)
    D  head_dim = C/H   F  intermediate_size         V  vocab_size     L  layers

Parameter names are transformers' LlamaForCausalLM's (model.embed_tokens, model.layers.N.self_attn
.q_proj, ..., mlp.gate_proj, input_layernorm, model.norm, lm_head), so a state dict is a Llama
state dict. RMSNorm, RoPE and the loss go through `octo_kernels.*` (Triton on CUDA, reference
elsewhere).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import octo.hf_io as hf_io
import octo_kernels
from octo.config import OctoConfig
from octo.memory import check_fits, kv_cache_bytes
from octo.sampling import sample_next


@dataclasses.dataclass
class CausalLMOutput:
    """loss: fp32 scalar (or (N,) for reduction="none") when labels were given, else None.
    logits: (B, T, V) when computed; None when the fused linear cross-entropy made the loss."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (T,) int -> cos, sin (T, D) in fp32, rotate-half layout (frequencies repeated)."""
    inv_freq = 1.0 / (
        theta
        ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    )  # (D/2,)
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, D)
    return emb.cos(), emb.sin()


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight, through octo_kernels.rms_norm."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., C) -> (..., C)
        return octo_kernels.rms_norm(x, self.weight, self.eps)


class KVCache:
    """Preallocated keys/values for generation: per layer (B, K, max_len, D), filled to `length`."""

    def __init__(self, cfg: OctoConfig, batch: int, max_len: int, device, dtype) -> None:
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        n = cfg.num_hidden_layers
        self.keys = [torch.empty(shape, device=device, dtype=dtype) for _ in range(n)]
        self.values = [torch.empty(shape, device=device, dtype=dtype) for _ in range(n)]
        self.length = 0  # positions already cached (the same for every layer)
        self.max_len = max_len

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (B, K, T, D) at [length, length+T); return the cached (B, K, P, D) views."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked for {end}")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class Attention(nn.Module):
    """Grouped-query self-attention through scaled_dot_product_attention."""

    def __init__(self, cfg: OctoConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=bias)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, C)
        cos: torch.Tensor,  # (T, D) fp32
        sin: torch.Tensor,  # (T, D) fp32
        attn_mask: torch.Tensor | None,  # (B, 1, T, P) bool, True = attend; None = causal
        cache: KVCache | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        q, k = octo_kernels.apply_rope(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, K, P, D)
        gqa = self.n_kv != self.n_heads  # keys and values are shared by H/K query heads each
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None, enable_gqa=gqa
        )  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, C)
        return self.o_proj(y)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, (B, T, F) each -> (B, T, F)."""
    return F.silu(gate) * up


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)).

    Under torch.compile (with autograd), silu(gate) * up is checkpointed: the backward recomputes
    it (Inductor fuses that into the kernel which needs it) instead of keeping it from the forward,
    since the backward already holds gate and up for the product's own gradient. One (B, T, F)
    activation less per layer: the compiled seed model keeps 551 MiB instead of 623 MiB per 1024
    tokens (bf16 autocast; measured on CPU), for no measured step time (CPU, tiny config). In
    eager mode the checkpoint's own overhead cost 8% of a tiny CPU step, so eager keeps it.
    """

    def __init__(self, cfg: OctoConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        gate, up = self.gate_proj(x), self.up_proj(x)  # (B, T, F)
        if torch.compiler.is_compiling() and torch.is_grad_enabled():
            return self.down_proj(checkpoint(swiglu, gate, up, use_reentrant=False))
        return self.down_proj(swiglu(gate, up))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: OctoConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attn_mask=None, cache=None):  # (B, T, C) -> (B, T, C)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class OctoModel(nn.Module):
    """Embeddings, L decoder layers, final norm: input_ids (B, T) -> hidden (B, T, C)."""

    def __init__(self, cfg: OctoConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class OctoForCausalLM(nn.Module):
    """Llama-architecture causal LM. forward(input_ids, labels) follows transformers' convention."""

    def __init__(self, config: OctoConfig) -> None:
        super().__init__()
        self.config = config
        self.model = OctoModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.gradient_checkpointing = False
        self.apply(self._init_weights)
        # GPT-2 style: residual output projections scaled by 1/sqrt(2L) so the stream's variance
        # does not grow with depth.
        std = config.initializer_range / math.sqrt(2 * config.num_hidden_layers)
        for layer in self.model.layers:
            nn.init.normal_(layer.self_attn.o_proj.weight, mean=0.0, std=std)
            nn.init.normal_(layer.mlp.down_proj.weight, mean=0.0, std=std)

    def tie_weights(self) -> None:
        """lm_head uses embed_tokens' weight when config.tie_word_embeddings (again after
        to_empty or load_state_dict(assign=True), which give each module a tensor of its own)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (a tied lm_head counts once)."""
        params = {id(p): p for p in self.parameters()}
        n = sum(p.numel() for p in params.values())
        if exclude_embeddings:
            n -= self.model.embed_tokens.weight.numel()
        return n

    def gradient_checkpointing_enable(self, enable: bool = True) -> None:
        """Recompute each decoder layer's activations in backward (non-reentrant checkpoint)."""
        self.gradient_checkpointing = enable

    def hidden_states(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, P) 1 = real token, 0 = padding
        cache: KVCache | None = None,
    ) -> torch.Tensor:  # (B, T, C), after the final norm
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence of {start + T} positions exceeds max_position_embeddings="
                f"{self.config.max_position_embeddings}"
            )
        positions = torch.arange(start, start + T, device=input_ids.device)  # (T,)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)  # (T, D)
        attn_mask = _attention_mask(attention_mask, B, T, start, input_ids.device)
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, attn_mask, cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, attn_mask, cache)
        if cache is not None:
            cache.length += T
        return self.model.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T) int64
        labels: torch.Tensor | None = None,  # (B, T) int64, aligned with input_ids, -100 = ignore
        attention_mask: torch.Tensor | None = None,  # (B, T) 1 = real token, 0 = padding
        return_logits: bool | None = None,  # default: only when there are no labels
        reduction: str = "mean",  # of the loss over non-ignored target tokens: mean | sum
    ) -> CausalLMOutput:
        """Logits and/or the loss. Position t predicts token t+1 (transformers' convention); with
        labels and no return_logits, the loss comes from octo_kernels.linear_cross_entropy, which
        never materialises (B, T, V) on the fused path, and .logits is None. Positions count from 0
        in every row, padded or not (as transformers' forward does without position_ids)."""
        h = self.hidden_states(input_ids, attention_mask)  # (B, T, C)
        if return_logits is None:
            return_logits = labels is None
        logits = self.lm_head(h) if return_logits else None  # (B, T, V)
        loss = None
        if labels is not None:
            # Shift: position t predicts token t+1. Pad labels instead of slicing h, so h stays
            # contiguous and the last position simply has nothing to predict.
            targets = F.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)  # (B*T,)
            if attention_mask is not None:
                # Never learn to predict padding, nor from padding: a padding query sees only
                # itself (see _attention_mask), so its output is no prediction of the next token.
                real = attention_mask.bool()  # (B, T)
                keep = F.pad(real[:, 1:] & real[:, :-1], (0, 1), value=False).reshape(-1)
                targets = torch.where(keep, targets, torch.full_like(targets, -100))
            if logits is not None:
                loss = octo_kernels.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), targets, reduction=reduction
                )
            else:
                loss = octo_kernels.linear_cross_entropy(
                    h.reshape(-1, h.shape[-1]), self.lm_head.weight, targets, reduction=reduction
                )
        return CausalLMOutput(loss=loss, logits=logits)

    @staticmethod
    def count_targets(input_ids: torch.Tensor) -> int:
        """Target tokens of forward(input_ids, labels=input_ids) without attention_mask: B * (T - 1)
        (the shift above: the last position predicts nothing). From the shape: no device sync."""
        return input_ids.shape[0] * (input_ids.shape[1] - 1)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,  # (B, T0) prompt
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | list[int] | None = None,
        generator: torch.Generator | None = None,
        *,
        do_sample: bool | None = None,
        pad_token_id: int | None = None,
        attention_mask: torch.Tensor | None = None,  # (B, T0), all ones
    ) -> torch.Tensor:  # (B, T0 + n) with n <= max_new_tokens
        """Sample with a KV cache: one prefill of the prompt, then one token per step; stops
        early once every row has produced an eos_token_id.

        The names are transformers' (LlamaForCausalLM.generate), with their meaning, so code
        written for it runs here: do_sample=False is greedy (temperature, top_k and top_p unused),
        do_sample=True samples (temperature must then be > 0); left out, temperature decides (0:
        greedy). eos_token_id is an id or a list of them; a finished row emits pad_token_id from
        then on (default: its first eos id). attention_mask, as a tokenizer returns it, must be
        all ones: prompts padded to one length are refused (generate them one by one), since
        their positions would not be transformers'. Octo's own defaults (temperature 1.0, no
        top-k or top-p filter) apply where an argument is left out. A KV cache larger than the
        device's free memory is refused (octo.memory.TooLargeError, a ValueError) before it is
        allocated."""
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError(
                "generate does not take padded prompts (attention_mask has zeros); generate "
                "each prompt on its own, or prompts of one length together"
            )
        if do_sample is not None:
            if do_sample and temperature <= 0:
                raise ValueError(f"do_sample=True needs temperature > 0, got {temperature}")
            temperature = temperature if do_sample else 0.0
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        fill = pad_token_id if pad_token_id is not None else (eos[0] if eos else None)
        was_training = self.training
        self.eval()
        B, T0 = input_ids.shape
        total = min(T0 + max_new_tokens, self.config.max_position_embeddings)
        dtype = self.model.embed_tokens.weight.dtype
        if torch.is_autocast_enabled(input_ids.device.type):
            dtype = torch.get_autocast_dtype(input_ids.device.type)
        check_fits(kv_cache_bytes(self.config, B, total, dtype), input_ids.device,
                   f"generating {B} sequence(s) of up to {total:,} positions (the KV cache)",
                   "lower max_new_tokens")  # fmt: skip
        cache = KVCache(self.config, B, total, input_ids.device, dtype)
        out = input_ids
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        eos_ids = torch.tensor(eos, dtype=torch.long, device=input_ids.device)  # (E,)
        step_ids = input_ids
        for _ in range(total - T0):
            h = self.hidden_states(step_ids, cache=cache)[:, -1]  # (B, C)
            logits = self.lm_head(h).float()  # (B, V)
            nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
            if eos:
                nxt = torch.where(done, torch.full_like(nxt, fill), nxt)
                done |= torch.isin(nxt, eos_ids)
            out = torch.cat([out, nxt[:, None]], dim=1)
            step_ids = nxt[:, None]  # (B, 1)
            if eos and bool(done.all()):
                break
        self.train(was_training)
        return out

    # Checkpoint interop lives in octo/hf_io.py; these are the public entry points.
    def save_pretrained(
        self, save_directory, max_shard_size: int | str = "2GB", token_ids: dict | None = None
    ) -> None:
        """Write config.json (Llama) and sharded safetensors loadable by transformers; token_ids:
        the tokenizer's special token ids, for config.json and generation_config.json."""
        hf_io.save_pretrained(
            self, save_directory, max_shard_size=max_shard_size, token_ids=token_ids
        )

    @classmethod
    def from_pretrained(cls, directory, device=None, dtype=None) -> OctoForCausalLM:
        """Load an Octo or transformers Llama folder (config.json + safetensors); never unpickles.
        device: default CPU; dtype: default float32. See octo.hf_io.from_pretrained."""
        return hf_io.from_pretrained(cls, directory, device=device, dtype=dtype)


def _attention_mask(
    padding: torch.Tensor | None, B: int, T: int, start: int, device: torch.device
) -> torch.Tensor | None:
    """(B, 1, T, P) bool mask, True = may attend, or None for the plain causal case (so SDPA can
    use is_causal and its fast kernels). Query t (absolute start + t) sees keys p <= start + t."""
    if padding is None and start == 0:
        return None
    P = start + T
    q_pos = torch.arange(start, P, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(P, device=device)[None, :]  # (1, P)
    mask = (k_pos <= q_pos)[None, None]  # (1, 1, T, P)
    if padding is not None:
        if padding.shape != (B, P):
            raise ValueError(
                f"attention_mask shape {tuple(padding.shape)} != (batch, positions) = {(B, P)}"
            )
        mask = mask & padding.bool()[:, None, None, :]  # (B, 1, T, P)
        # A fully masked row (a padding query under left padding) would make softmax NaN:
        # let every query see its own position; its output is never used as a target.
        mask = mask | (k_pos == q_pos)[None, None]
    return mask.expand(B, 1, T, P)
