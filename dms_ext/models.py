"""A small plain-torch Llama / Qwen3-style decoder that can carry DMS (docs/semantics.md).

One model, five ways to run attention:

  (a) ``forward(ids, attention="causal")``   dense causal, no eviction (the teacher).
  (b) ``forward(ids, attention="dms")``      dense, masked by the DMS visibility rule of the hard
                                             decisions d_j = (l_{j+1} > 0)
                                             (``dms_ext.reference.visibility_mask`` semantics).
  (c) ``forward(ids, attention="relaxed")``  the retrofit relaxation: logistic noise, temperature
                                             tau, + log(1 - alpha_j) on scores beyond the window.
                                             FlexAttention on CUDA, dense masked math elsewhere.
  (d) ``forward_cache(cache, ...)``          incremental, through ``dms_ext.DMSCache.attend``
                                             and the dms kernels (prefill chunks, 1-token steps).
  (e) ``forward_heuristic(hcache, ...)``     training-free eviction (sliding window, H2O, TOVA) at
                                             a fixed per-head budget, plain torch.

Parameter names follow Hugging Face Llama / Qwen3 (``model.layers.0.self_attn.q_proj.weight``
...), so a checkpoint written by :meth:`DMSForCausalLM.save_pretrained` is a ``config.json`` +
``pytorch_model.bin`` pair that transformers' Qwen3 / Llama classes read (DMS settings ride
along under ``"dms"`` in the config; the adapter variant adds ``self_attn.dms_norm`` and
``self_attn.dms_proj``).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .heuristics import POLICIES, HeuristicCache
from .ops import has_kernel
from .reference import borrowed_logits, rope, visibility_mask

__all__ = [
    "ModelConfig", "DMSForCausalLM", "HeuristicCache", "dms_visibility_mask", "relaxed_bias",
    "st_decisions", "convert_to_dms", "VARIANTS", "ATTENTIONS", "POLICIES",
]

VARIANTS = ("none", "borrowed", "adapter")
ATTENTIONS = ("causal", "dms", "relaxed")


@dataclass
class ModelConfig:
    """Shape and DMS settings of :class:`DMSForCausalLM`.

    variant: where eviction logits come from (docs/semantics.md section 10): ``"borrowed"``
    (channel D-1 of
    query head g*G after q-norm, before RoPE), ``"adapter"`` (Linear(RMSNorm(h)) of the layer
    input, one output per KV head) or ``"none"`` (a plain model: no logits, nothing zeroed).
    """
    hidden: int = 384
    layers: int = 6
    heads: int = 8
    kv_heads: int = 2
    head_dim: int = 64
    vocab: int = 512
    window: int = 64
    alpha_scale: float = 100.0
    alpha_offset: float = 5.0
    variant: str = "none"
    intermediate: int = 1024
    qk_norm: bool = True          # Qwen3 per-head q/k RMSNorm; False gives Llama
    rope_theta: float = 10000.0
    max_position: int = 4096
    rms_eps: float = 1e-6
    tie_embeddings: bool = False
    attention_bias: bool = False  # biases on q/k/v/o_proj (HF Llama / Qwen3 attention_bias)

    def __post_init__(self):
        for name in ("hidden", "layers", "heads", "kv_heads", "head_dim", "vocab", "window",
                     "intermediate", "max_position"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads: must be a multiple of kv_heads={self.kv_heads}, got {self.heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim: rotate-half RoPE needs an even head_dim, got {self.head_dim}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant: expected one of {VARIANTS}, got {self.variant!r}")

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    # HF-style config.json (Qwen3 when qk_norm else Llama) with the DMS settings under "dms".
    def to_hf_dict(self) -> dict:
        arch, mtype = (("Qwen3ForCausalLM", "qwen3") if self.qk_norm else ("LlamaForCausalLM", "llama"))
        return {
            "architectures": [arch], "model_type": mtype, "hidden_size": self.hidden,
            "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim, "vocab_size": self.vocab, "rms_norm_eps": self.rms_eps,
            "rope_theta": self.rope_theta, "max_position_embeddings": self.max_position,
            "tie_word_embeddings": self.tie_embeddings, "hidden_act": "silu",
            "attention_bias": self.attention_bias, "torch_dtype": "float32",
            "dms": {"window": self.window, "alpha_scale": self.alpha_scale,
                    "alpha_offset": self.alpha_offset, "variant": self.variant},
            "dms_ext_config": asdict(self),
        }

    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        if "dms_ext_config" in d:
            names = {f.name for f in fields(cls)}
            return cls(**{k: v for k, v in d["dms_ext_config"].items() if k in names})
        dms = d.get("dms", {})
        return cls(hidden=d["hidden_size"], layers=d["num_hidden_layers"],
                   heads=d["num_attention_heads"], kv_heads=d["num_key_value_heads"],
                   head_dim=d.get("head_dim", d["hidden_size"] // d["num_attention_heads"]),
                   vocab=d["vocab_size"], intermediate=d["intermediate_size"],
                   window=dms.get("window", 512), alpha_scale=dms.get("alpha_scale", 100.0),
                   alpha_offset=dms.get("alpha_offset", 5.0), variant=dms.get("variant", "none"),
                   qk_norm=d.get("model_type") == "qwen3", rope_theta=d.get("rope_theta", 10000.0),
                   max_position=d.get("max_position_embeddings", 4096),
                   rms_eps=d.get("rms_norm_eps", 1e-6),
                   tie_embeddings=d.get("tie_word_embeddings", False),
                   attention_bias=d.get("attention_bias", False))


# ----------------------------------------------------------------------------- DMS pieces

# dms_visibility_mask is reference.visibility_mask (batched: logits [B, N, Hkv] -> [B, Hkv, N, N]).
dms_visibility_mask = visibility_mask


def relaxed_bias(z: torch.Tensor) -> torch.Tensor:
    """float32 [B, Hkv, N]: the score penalty of key j beyond the window, log(1 - alpha_j) =
    logsigmoid(-z_{j+1}) (token j+1 decides about j); the newest key has no decision: 0."""
    pen = F.logsigmoid(-z[:, 1:].to(torch.promote_types(z.dtype, torch.float32)))
    pen = torch.cat([pen, pen.new_zeros(z.shape[0], 1, z.shape[2])], dim=1)
    return pen.transpose(1, 2).contiguous()


def st_decisions(z: torch.Tensor) -> torch.Tensor:
    """Hard decisions (z > 0) in the forward pass, d sigmoid(z) / dz in the backward pass."""
    alpha = torch.sigmoid(z)
    return (z > 0).to(alpha.dtype) - alpha.detach() + alpha


def logistic_noise(shape, device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """log(u) - log(1 - u): the difference of two Gumbel samples."""
    u = torch.rand(shape, device=device, generator=generator).clamp_(1e-6, 1 - 1e-6)
    return torch.log(u) - torch.log1p(-u)


_BLOCK_MASKS: Dict[Tuple[int, str], object] = {}
_FLEX = None


def _flex_relaxed_impl(q, k, v, bias, block_mask, window: int, group: int):
    from torch.nn.attention.flex_attention import flex_attention

    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.where(q_idx - kv_idx > window, score + bias[b, h // group, kv_idx], score)

    return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=True)


def _flex_relaxed(q, k, v, bias, window: int, group: int, compiled: Optional[bool] = None):
    """q [B, Hq, N, D], k, v [B, Hkv, N, D], bias float32 [B, Hkv, N]; causal block mask."""
    global _FLEX
    from torch.nn.attention.flex_attention import create_block_mask
    n = q.shape[2]
    key = (n, str(q.device))
    if key not in _BLOCK_MASKS:
        _BLOCK_MASKS[key] = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, n, n,
                                              device=q.device)
    fn = _flex_relaxed_impl
    if compiled is None:
        compiled = q.is_cuda
    if compiled:
        if _FLEX is None:
            # Eager FlexAttention materialises the scores; the compiled one is the fused kernel.
            _FLEX = torch.compile(_flex_relaxed_impl, dynamic=False)
        fn = _FLEX
    return fn(q, k, v, bias, _BLOCK_MASKS[key], window, group)


# ----------------------------------------------------------------------------- modules

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.to(xf.dtype)
        return y.to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear (no bias) with an optional low-rank adapter: W x + (B A x) * scale."""

    def __init__(self, fin: int, fout: int, bias: bool = False):
        super().__init__(fin, fout, bias=bias)
        self.lora_A: Optional[nn.Parameter] = None
        self.lora_B: Optional[nn.Parameter] = None
        self.lora_scale = 1.0

    def add_lora(self, rank: int, alpha: Optional[float] = None) -> None:
        # B = 0: the adapted model starts as the base model.
        self.lora_A = nn.Parameter(torch.randn(rank, self.in_features, device=self.weight.device)
                                   / math.sqrt(self.in_features))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=self.weight.device))
        self.lora_scale = (alpha if alpha is not None else rank) / rank

    @torch.no_grad()
    def merge_lora(self) -> None:
        if self.lora_A is None:
            return
        self.weight += (self.lora_B.float() @ self.lora_A.float()).to(self.weight.dtype) * self.lora_scale
        self.lora_A = self.lora_B = None

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.lora_A is not None:
            y = y + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.lora_scale
        return y


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        h, d = cfg.hidden, cfg.head_dim
        b = cfg.attention_bias
        self.q_proj = Linear(h, cfg.heads * d, b)
        self.k_proj = Linear(h, cfg.kv_heads * d, b)
        self.v_proj = Linear(h, cfg.kv_heads * d, b)
        self.o_proj = Linear(cfg.heads * d, h, b)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_eps)
            self.k_norm = RMSNorm(d, cfg.rms_eps)
        if cfg.variant == "adapter":
            self.dms_norm = RMSNorm(h, cfg.rms_eps)
            self.dms_proj = nn.Linear(h, cfg.kv_heads, bias=False)
            nn.init.zeros_(self.dms_proj.weight)   # logits start at -alpha_offset: evict nothing
        keep = torch.ones(cfg.heads, d)
        if cfg.variant == "borrowed":
            keep[:: cfg.group, d - 1] = 0.0
        self.register_buffer("channel_keep", keep, persistent=False)

    def project(self, x: torch.Tensor, h_in: torch.Tensor, positions: torch.Tensor,
                cos_sin: torch.Tensor):
        """x (normed) and h_in (raw layer input) [*, hidden], positions [*] ->
        q [*, Hq, D], k, v [*, Hkv, D] (RoPE applied), logits float32 [*, Hkv] or None."""
        c = self.cfg
        lead = x.shape[:-1]
        q = self.q_proj(x).view(*lead, c.heads, c.head_dim)
        k = self.k_proj(x).view(*lead, c.kv_heads, c.head_dim)
        v = self.v_proj(x).view(*lead, c.kv_heads, c.head_dim)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        ct = torch.promote_types(q.dtype, torch.float32)     # float32, or float64 in tests
        logits = None
        if c.variant == "borrowed":
            # In q's dtype, as NVIDIA's reference (and the eviction_rope kernel) round it.
            logits = borrowed_logits(q[..., :: c.group, c.head_dim - 1], c.alpha_scale,
                                     c.alpha_offset).to(ct)
        elif c.variant == "adapter":
            logits = self.dms_proj(self.dms_norm(h_in)).to(ct) * c.alpha_scale - c.alpha_offset
        cs = cos_sin[positions].to(ct)
        cos, sin = cs[..., None, : c.head_dim // 2], cs[..., None, c.head_dim // 2:]
        keep = self.channel_keep.to(ct)
        # Zero the borrowed channel before RoPE (it is the logit, not a feature) and after it
        # (rotate-half writes channel D/2-1 into D-1).
        q = rope(q.to(ct) * keep, cos, sin) * keep
        k = rope(k.to(ct), cos, sin)
        return q.to(v.dtype), k.to(v.dtype), v, logits


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden, cfg.intermediate)
        self.up_proj = Linear(cfg.hidden, cfg.intermediate)
        self.down_proj = Linear(cfg.intermediate, cfg.hidden)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.mlp = MLP(cfg)


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab, cfg.hidden)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden, cfg.rms_eps)


class DMSForCausalLM(nn.Module):
    """The decoder. ``forward`` runs a whole batch of sequences [B, N] (modes a-c above);
    ``forward_cache`` and ``forward_heuristic`` run incrementally (modes d, e)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from .reference import rope_cache
        self.cfg = cfg
        self.model = DecoderModel(cfg)
        self.lm_head = Linear(cfg.hidden, cfg.vocab)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("cos_sin", rope_cache(cfg.max_position, cfg.head_dim, cfg.rope_theta),
                             persistent=False)
        self.apply(self._init)
        for layer in self.model.layers:
            if cfg.variant == "adapter":
                nn.init.zeros_(layer.self_attn.dms_proj.weight)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    # ------------------------------------------------------------------ (a) (b) (c)

    def forward(self, input_ids: torch.Tensor, attention: str = "causal", *, tau: float = 0.1,
                noise: bool = True, generator: Optional[torch.Generator] = None,
                flex: Optional[bool] = None, return_aux: bool = False):
        """input_ids int [B, N] (positions 0..N-1) -> next-token logits [B, N, vocab].

        attention: "causal" (a), "dms" (b: hard decisions l > 0, visibility rule) or
        "relaxed" (c: z = (l + noise) / tau, logsigmoid(-z) on scores beyond the window).
        flex: use FlexAttention for "relaxed" (default: on CUDA). With ``return_aux`` also
        returns {"logits": [L x [B, N, Hkv]] raw eviction logits, "z": [L x [B, N, Hkv]]
        (relaxed only)}."""
        c = self.cfg
        if attention not in ATTENTIONS:
            raise ValueError(f"attention: expected one of {ATTENTIONS}, got {attention!r}")
        if attention != "causal" and c.variant == "none":
            raise ValueError(f"attention: {attention!r} needs a DMS variant; this model has variant 'none'")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError("input_ids: expected an int tensor [B, N]")
        b, n = input_ids.shape
        if n > c.max_position:
            raise ValueError(f"input_ids: {n} tokens exceed max_position={c.max_position}")
        if flex is None:
            flex = input_ids.device.type == "cuda"
        positions = torch.arange(n, device=input_ids.device)
        cos_sin = self.cos_sin.float()
        x = self.model.embed_tokens(input_ids)
        aux = {"logits": [], "z": []}
        for layer in self.model.layers:
            at = layer.self_attn
            q, k, v, logits = at.project(layer.input_layernorm(x), x, positions, cos_sin)
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))     # [B, H, N, D]
            if attention == "causal":
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            elif attention == "dms":
                # K/V expanded to Hq heads: the memory-efficient SDPA kernels take a mask but
                # not always GQA, and the math fallback would materialise fp32 scores.
                mask = dms_visibility_mask(logits, c.window).repeat_interleave(c.group, dim=1)
                o = F.scaled_dot_product_attention(q, k.repeat_interleave(c.group, dim=1),
                                                   v.repeat_interleave(c.group, dim=1), attn_mask=mask)
            else:
                z = logits
                if noise:
                    z = z + logistic_noise(z.shape, z.device, generator)
                z = z / tau
                aux["z"].append(z)
                bias = relaxed_bias(z)
                if flex:
                    with torch.autocast(device_type=q.device.type, enabled=False):
                        o = _flex_relaxed(q, k, v, bias, c.window, c.group)
                else:
                    o = _dense_relaxed(q, k, v, bias, c.window, c.group)
            if logits is not None:
                aux["logits"].append(logits)
            x = x + at.o_proj(o.transpose(1, 2).reshape(b, n, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        out = self.lm_head(self.model.norm(x))
        return (out, aux) if return_aux else out

    # ------------------------------------------------------------------ (d) DMSCache

    @torch.no_grad()
    def forward_cache(self, cache, seq_ids: Sequence[int], cu_seqlens: torch.Tensor,
                      input_ids: torch.Tensor, positions: torch.Tensor,
                      use_kernel: bool = True) -> torch.Tensor:
        """Packed chunks through ``cache.attend`` (one call per layer): input_ids, positions
        [T] (chunk i = rows cu_seqlens[i]:cu_seqlens[i+1], continuing seq_ids[i]) -> next-token
        logits [T, vocab] float32. The borrowed variant uses the ``dms.eviction_rope`` kernel
        when ``use_kernel`` and the op has a kernel for the device; a "none" model never evicts."""
        c = self.cfg
        dtype = cache.dtype
        cos_sin = self.cos_sin.float()
        kernel = (use_kernel and c.variant == "borrowed"
                  and has_kernel("eviction_rope", input_ids.device))
        x = self.model.embed_tokens(input_ids)
        t = input_ids.shape[0]
        for i, layer in enumerate(self.model.layers):
            at = layer.self_attn
            hn = layer.input_layernorm(x)
            if kernel:
                q = at.q_proj(hn).view(t, c.heads, c.head_dim).to(dtype).contiguous()
                k = at.k_proj(hn).view(t, c.kv_heads, c.head_dim).to(dtype).contiguous()
                qn = at.q_norm.weight.to(dtype) if c.qk_norm else None
                kn = at.k_norm.weight.to(dtype) if c.qk_norm else None
                logits = torch.ops.dms.eviction_rope(q, k, positions, cos_sin, float(c.alpha_scale),
                                                     float(c.alpha_offset), qn, kn, float(c.rms_eps))
                v = at.v_proj(hn).view(t, c.kv_heads, c.head_dim)
            else:
                q, k, v, logits = at.project(hn, x, positions, cos_sin)
                if logits is None:
                    logits = torch.full((t, c.kv_heads), -1e4, device=x.device)
            cd = cache.device
            o = cache.attend(i, seq_ids, cu_seqlens, q.to(cd, dtype).contiguous(),
                             k.to(cd, dtype).contiguous(), v.to(cd, dtype).contiguous(),
                             logits.to(cd, torch.float32))
            x = x + at.o_proj(o.reshape(t, -1).to(x.device, x.dtype))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.lm_head(self.model.norm(x)).float()

    # ------------------------------------------------------------------ (e) heuristics

    @torch.no_grad()
    def forward_heuristic(self, hcache: "HeuristicCache", input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T]: the next T tokens of every sequence (all at the same position) ->
        logits [B, T, vocab] float32. T > 1 only while the cache stays within its budget."""
        c = self.cfg
        b, t = input_ids.shape
        positions = hcache.pos + torch.arange(t, device=input_ids.device)  # no host sync
        cos_sin = self.cos_sin.float()
        x = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.model.layers):
            at = layer.self_attn
            q, k, v, _ = at.project(layer.input_layernorm(x), x, positions, cos_sin)
            o = hcache.attend(i, q, k, v)
            x = x + at.o_proj(o.reshape(b, t, -1).to(x.dtype))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        hcache.advance(t)
        return self.lm_head(self.model.norm(x)).float()

    # ------------------------------------------------------------------ LoRA, checkpoints

    def add_lora(self, rank: int, alpha: Optional[float] = None,
                 targets: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj")) -> List[nn.Parameter]:
        """Low-rank adapters on the attention projections; returns the new parameters."""
        params = []
        for layer in self.model.layers:
            for name in targets:
                lin = getattr(layer.self_attn, name)
                lin.add_lora(rank, alpha)
                params += [lin.lora_A, lin.lora_B]
        return params

    def merge_lora(self) -> None:
        for m in self.modules():
            if isinstance(m, Linear):
                m.merge_lora()

    def eviction_parameters(self) -> List[Tuple[str, nn.Parameter, Optional[torch.Tensor]]]:
        """(name, parameter, row mask or None) of what produces the eviction logits: the donor
        rows of q_proj (mask marks them) for "borrowed", dms_norm / dms_proj for "adapter"."""
        c = self.cfg
        out = []
        for i, layer in enumerate(self.model.layers):
            at = layer.self_attn
            if c.variant == "borrowed":
                rows = torch.zeros(c.heads * c.head_dim, dtype=torch.bool, device=at.q_proj.weight.device)
                rows[torch.arange(c.kv_heads) * c.group * c.head_dim + c.head_dim - 1] = True
                out.append((f"model.layers.{i}.self_attn.q_proj.weight", at.q_proj.weight, rows))
                if at.q_proj.bias is not None:
                    out.append((f"model.layers.{i}.self_attn.q_proj.bias", at.q_proj.bias, rows))
            elif c.variant == "adapter":
                out.append((f"model.layers.{i}.self_attn.dms_norm.weight", at.dms_norm.weight, None))
                out.append((f"model.layers.{i}.self_attn.dms_proj.weight", at.dms_proj.weight, None))
        return out

    def save_pretrained(self, path: str) -> None:
        """config.json + pytorch_model.bin (LoRA merged into a copy of the weights)."""
        os.makedirs(path, exist_ok=True)
        sd = {}
        lin = {n: m for n, m in self.named_modules() if isinstance(m, Linear)}
        for name, t in self.state_dict().items():
            if ".lora_" in name:
                continue
            mod = name.rsplit(".", 1)[0]
            if name.endswith(".weight") and mod in lin and lin[mod].lora_A is not None:
                m = lin[mod]
                t = t + (m.lora_B.float() @ m.lora_A.float()).to(t.dtype) * m.lora_scale
            sd[name] = t.detach().cpu().contiguous()
        if self.cfg.tie_embeddings:
            sd.pop("lm_head.weight", None)
        torch.save(sd, os.path.join(path, "pytorch_model.bin"))
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(self.cfg.to_hf_dict(), f, indent=2)

    @classmethod
    def from_pretrained(cls, path: str, map_location="cpu") -> "DMSForCausalLM":
        with open(os.path.join(path, "config.json")) as f:
            cfg = ModelConfig.from_hf_dict(json.load(f))
        model = cls(cfg)
        sd = torch.load(os.path.join(path, "pytorch_model.bin"), map_location=map_location,
                        weights_only=True)
        model.load_state_dict(sd, strict=not cfg.tie_embeddings)
        return model


def _dense_relaxed(q, k, v, bias, window: int, group: int):
    """Dense twin of the FlexAttention path: scores + (t - j > w) * bias[j], causal."""
    n = q.shape[2]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    ct = torch.promote_types(q.dtype, torch.float32)
    s = (q.to(ct) @ k.to(ct).transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    pos = torch.arange(n, device=q.device)
    dist = pos[:, None] - pos[None, :]
    pen = bias.repeat_interleave(group, dim=1)[:, :, None, :]
    s = torch.where(dist > window, s + pen, s).masked_fill(dist < 0, float("-inf"))
    return (torch.softmax(s.to(ct), dim=-1) @ v.to(ct)).to(v.dtype)


def convert_to_dms(model: DMSForCausalLM, variant: str = "borrowed", *,
                   window: Optional[int] = None, alpha_scale: Optional[float] = None,
                   alpha_offset: Optional[float] = None) -> DMSForCausalLM:
    """A DMS copy of a plain model, starting with every logit at -alpha_offset (no eviction):
    "borrowed" zeroes the donor rows of q_proj (channel D-1 of query head g*G, which the model
    gives up), "adapter" adds zero-initialised dms_norm / dms_proj."""
    if variant not in ("borrowed", "adapter"):
        raise ValueError(f"variant: expected 'borrowed' or 'adapter', got {variant!r}")
    c = model.cfg
    new = replace(c, variant=variant, window=c.window if window is None else window,
                  alpha_scale=c.alpha_scale if alpha_scale is None else alpha_scale,
                  alpha_offset=c.alpha_offset if alpha_offset is None else alpha_offset)
    dev = next(model.parameters()).device
    out = DMSForCausalLM(new).to(dev)
    sd = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    missing, unexpected = out.load_state_dict(sd, strict=False)
    if unexpected or any("dms_" not in m for m in missing):
        raise ValueError(f"model: state dict does not fit (missing {missing}, unexpected {unexpected})")
    with torch.no_grad():
        for _, p, rows in out.eviction_parameters():
            if rows is not None:
                p[rows] = 0.0
    return out
