"""Multi-head Latent Attention (DeepSeek-V3 report sec. 2.1.1), on Megatron-Core's parallel linears.

Shapes: s = sequence, s_l = local sequence (s / TP under sequence parallelism), b = batch,
H = heads, H_l = heads on this TP rank, dn = qk_nope_head_dim, dr = qk_rope_head_dim, dv = v_head_dim.

    q      = q_up(RMSNorm(q_down(x)))          or q_proj(x) when q_lora_rank is None   [s, b, H_l, dn+dr]
    c, kpe = split(kv_down(x), [kv_lora_rank, dr])                                        [s_l, b, *]
    k_nope, v = split(kv_up(RMSNorm(c)), [dn, dv])                                       [s, b, H_l, *]
    q_pe, k_pe = RoPE(q[..., dn:]), RoPE(kpe)          (kpe: ONE head shared by all heads, not normed)
    out    = o_proj(dropout(softmax(q k^T * scale + mask)) v),  scale = (dn+dr)^-0.5 * mscale^2

mask: causal, or Megatron's [b, 1, s, s] bool attention mask (True = masked; GPTDataset builds it
causal per document with --reset-attention-mask). RoPE is relative, so a document packed at offset
o attends exactly as when run alone at positions 0..len-1 (--reset-position-ids changes nothing).
dropout (--attention-dropout) on the attention probabilities draws from Megatron's model-parallel
RNG stream (heads differ across TP ranks), so recomputation and checkpoint resume repeat it.

Selective recomputation (``--recompute-granularity selective --recompute-modules ...``, DeepSeek-V3
report sec. 3.2.3; the names are Megatron-Core's):
    mla_up_proj  q_up / kv_up, their latent RMSNorms and RoPE run again in backward; query, key and
                 value are dropped after the attention core (output-discarding checkpoint)
    layernorm    (without mla_up_proj) the latent RMSNorm outputs are dropped and recomputed;
                 Megatron's TransformerLayer recomputes the input / pre-MLP RMSNorms under this name
    core_attn    the attention core (mask, softmax, dropout) runs again in backward

Attention kernel (:func:`attention_kernel`, a pure function of the device, the head sizes, the
sequence length and the dropout, so a run and its resumed continuation compute the same way): MLA's
query/key head size (dn + dr) differs from its value head size (dv), which sends torch's SDPA on CPU
to its math fallback. Padding V with zeros to dn + dr selects the CPU flash kernel (the padded columns
of the output are dropped; outputs and gradients equal within fp32 rounding) where it is faster; for
large heads below 768 tokens without dropout our written-out kernel (:class:`_ExplicitAttention`:
three batched products forward, four backward) beats both. On GPUs SDPA gets the tensors unpadded
and picks its own fused kernel (cuDNN / memory-efficient attention take unequal head sizes).

Parallelism: q_up / kv_up / q_proj are column-parallel over heads (they also all-gather the
sequence under SP), o_proj is row-parallel. The down projections are small and duplicated on every
TP rank; under SP each rank runs them on its own tokens only (no redundant work) and their weights
are marked ``sequence_parallel`` so finalize_model_grads sums their gradients over TP.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.utils import log_single_rank

from .gemm import linear
from .rope import apply_rope, cos_sin, inverse_frequencies, yarn_mscale


#: The CPU rule, from ``tools/bench_layers.py --attention-kernels`` (fp32, forward + backward, causal,
#: torch 2.13, 2026-12-02; ms at one thread, the same winners at two). With large q/k heads our
#: written-out kernel (``explicit``) is the fastest below 768 tokens: (dn+dr, dv) = (96, 64) at 256
#: tokens 13.5 vs 17.4 padded / 15.8 math, at 512: 56.7 vs 65.0 / 73.6; (192, 128) at 256: 50.0 vs
#: 64.2 / 57.0, at 512: 100.2 vs 124.9 / 101.0 (it keeps the probabilities, as the math kernel it
#: replaces there does). The flash kernel (V padded, keeps only the log-sum-exp) from 768 tokens
#: ((192, 128) at 768: 228 vs 270 explicit; at 2048: 608 vs 1021) and for small heads at every
#: length: at (24, 16) it loses only at 128 tokens (1.62 vs 1.41 ms), too little to pay for keeping
#: the probabilities (+~10 MiB peak RSS in tools/bench_train.py), and wins from 256 (5.6 vs 6.3).
#: The flash kernel takes masks but no dropout; the explicit kernel takes Megatron's bool mask and no
#: dropout.
CPU_FLASH_MAX_SMALL_HEAD = 64
CPU_FLASH_MIN_SEQ = 768


def attention_kernel(device_type: str, qk_head_dim: int, v_head_dim: int, seq: int, dropout: float) -> str:
    """The attention core's kernel: ``"sdpa"`` (tensors as they are; SDPA picks), ``"sdpa_padded_v"``
    (V zero-padded to the query/key head size, so torch's CPU flash kernel runs; output sliced back)
    or ``"explicit"`` (:class:`_ExplicitAttention`)."""
    if device_type != "cpu" or qk_head_dim == v_head_dim or dropout > 0:
        return "sdpa"
    if qk_head_dim <= CPU_FLASH_MAX_SMALL_HEAD or seq >= CPU_FLASH_MIN_SEQ:
        return "sdpa_padded_v"
    return "explicit"


class _ExplicitAttention(torch.autograd.Function):
    """``softmax(scale * q k^T + causal bias or mask) @ v`` with its backward written out: three batched
    products forward, four backward, the probabilities kept (like SDPA's math kernel, unlike flash).

    q, k [b, H, s, dq], v [b, H, s, dv] (views of [s, b, H, d] tensors are fine); ``bias`` [s, s]
    additive (causal) or ``mask`` bool [b or 1, 1, s, s], True = masked. No dropout. Backward:
    dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dP * P)) * scale, dQ = dS K, dK = dS^T Q.
    """

    @staticmethod
    def forward(ctx, q, k, v, scale: float, bias, mask):
        b, H, s, dq = q.shape
        q3, k3, v3 = q.reshape(b * H, s, dq), k.reshape(b * H, s, dq), v.reshape(b * H, s, v.shape[-1])
        if bias is not None:
            scores = torch.baddbmm(bias, q3, k3.transpose(1, 2), alpha=scale)
        else:
            scores = torch.bmm(q3, k3.transpose(1, 2)).mul_(scale)
            scores.view(b, H, s, s).masked_fill_(mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        ctx.save_for_backward(q3, k3, v3, probs)
        ctx.scale, ctx.heads = scale, (b, H)
        return torch.bmm(probs, v3).view(b, H, s, v.shape[-1])

    @staticmethod
    def backward(ctx, g):
        q3, k3, v3, probs = ctx.saved_tensors
        (b, H), s = ctx.heads, probs.shape[-1]
        if 0 in g.stride():           # an expanded gradient (out.sum()) would send bmm to a slow path
            g = g.contiguous()
        g3 = g.reshape(b * H, s, g.shape[-1])
        gv = torch.bmm(probs.transpose(1, 2), g3)
        gp = torch.bmm(g3, v3.transpose(1, 2))
        gs = gp.sub_((gp * probs).sum(dim=-1, keepdim=True)).mul_(probs).mul_(ctx.scale)
        gq, gk = torch.bmm(gs, k3), torch.bmm(gs.transpose(1, 2), q3)
        return gq.view(b, H, s, -1), gk.view(b, H, s, -1), gv.view(b, H, s, -1), None, None, None


_log = logging.getLogger(__name__)
_LOGGED_KERNELS: set = set()


def _log_kernel_once(kernel: str, device_type: str, dq: int, dv: int, seq: int, dropout: float) -> None:
    key = (kernel, device_type, dq, dv, seq, dropout > 0)
    if key in _LOGGED_KERNELS:
        return
    _LOGGED_KERNELS.add(key)
    why = {"sdpa_padded_v": f"V padded {dv} -> {dq} for the {device_type.upper()} flash kernel",
           "sdpa": "SDPA picks its kernel",
           "explicit": "softmax(q k^T) v written out: the fastest CPU kernel for these heads and length"}[kernel]
    log_single_rank(_log, logging.INFO, f"MLA attention core (seq {seq}, q/k head {dq}, v head {dv}, "
                    f"dropout {dropout}): {kernel} ({why})")


def mla_softmax_scale(config) -> float:
    """(dn + dr)^-0.5 * m^2 with m = yarn_mscale(factor, mscale_all_dim) under YaRN (DSv3: 0.1352338)."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    rs = config.rope_scaling
    if rs is not None and rs["factor"] > 1:
        m = yarn_mscale(rs["factor"], rs["mscale_all_dim"])
        scale *= m * m
    return scale


class DuplicatedLinear(torch.nn.Module):
    """A linear layer replicated on every TP rank (Megatron's local backend has none).

    Same constructor keywords as Megatron's parallel linears; returns ``(output, None)``.
    """

    def __init__(self, input_size: int, output_size: int, *, config, init_method, bias: bool = False,
                 skip_bias_add: bool = False, is_expert: bool = False, **_unused):
        super().__init__()
        if bias:
            raise ValueError("DuplicatedLinear: DeepSeek-V3 projections have no bias")
        self.weight = torch.nn.Parameter(torch.empty(output_size, input_size, dtype=config.params_dtype))
        if config.perform_initialization:
            init_method(self.weight)
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor):
        return linear(x, self.weight), None


@dataclass
class MLASubmodules:
    """Classes for each projection and norm of :class:`MultiLatentAttention`."""

    linear_q_proj: type = None
    linear_q_down_proj: type = None
    linear_q_up_proj: type = None
    linear_kv_down_proj: type = None
    linear_kv_up_proj: type = None
    linear_proj: type = None
    q_layernorm: type = None
    kv_layernorm: type = None


#: Megatron-Core's ``--recompute-modules`` names that act on a DeepSeek-V3 layer, and where. The
#: launcher refuses every other name (training/checks.py).
RECOMPUTE_MODULES = {
    "core_attn": "MultiLatentAttention: the attention core (mask, softmax, dropout)",
    "mla_up_proj": "MultiLatentAttention: q/kv up-projections with their latent RMSNorms and RoPE; "
                   "query/key/value dropped after the attention core",
    "layernorm": "Megatron's TransformerLayer: input and pre-MLP RMSNorm outputs dropped; "
                 "MultiLatentAttention: the latent RMSNorms (when mla_up_proj is off)",
    "mlp": "Megatron's TransformerLayer: the dense SwiGLU layers",
    "moe": "Megatron's MoELayer: the whole MoE layer (router, dispatch, experts, shared expert)",
    "shared_experts": "Megatron's MoELayer: the shared expert",
    "moe_act": "Megatron's grouped-GEMM experts (--moe-grouped-gemm): the expert activation",
}


class MultiLatentAttention(MegatronModule):
    """DeepSeek-V3 MLA self-attention, causal or with Megatron's attention mask (Megatron attention
    module interface)."""

    def __init__(self, config, submodules: MLASubmodules, layer_number: int,
                 attn_mask_type: AttnMaskType = AttnMaskType.causal,
                 pg_collection: Optional[ProcessGroupCollection] = None, name: str | None = None,
                 **_unused):
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError("MultiLatentAttention supports causal attention only")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.tp_group = pg_collection.tp
        self.tp_size = self.tp_group.size()
        self.layer_number = layer_number
        c = config
        self.n_local_heads = c.num_attention_heads // self.tp_size
        self.dn, self.dr, self.dv = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        dq = self.dn + self.dr
        H = c.num_attention_heads
        col = dict(config=c, init_method=c.init_method, gather_output=False, bias=False,
                   skip_bias_add=False, is_expert=False, tp_group=self.tp_group)
        dup = dict(config=c, init_method=c.init_method, bias=False, skip_bias_add=False,
                   is_expert=False, skip_weight_param_allocation=False)
        if c.q_lora_rank is None:
            self.linear_q_proj = build_module(submodules.linear_q_proj, c.hidden_size, H * dq, **col,
                                              tp_comm_buffer_name="q_proj")
        else:
            self.linear_q_down_proj = build_module(submodules.linear_q_down_proj, c.hidden_size,
                                                   c.q_lora_rank, **dup, tp_comm_buffer_name="q_down_proj")
            self.q_layernorm = submodules.q_layernorm(config=c, hidden_size=c.q_lora_rank,
                                                      eps=c.layernorm_epsilon)
            self.linear_q_up_proj = build_module(submodules.linear_q_up_proj, c.q_lora_rank, H * dq, **col,
                                                 tp_comm_buffer_name="q_up_proj")
        self.linear_kv_down_proj = build_module(submodules.linear_kv_down_proj, c.hidden_size,
                                                c.kv_lora_rank + self.dr, **dup,
                                                tp_comm_buffer_name="kv_down_proj")
        self.kv_layernorm = submodules.kv_layernorm(config=c, hidden_size=c.kv_lora_rank,
                                                    eps=c.layernorm_epsilon)
        self.linear_kv_up_proj = build_module(submodules.linear_kv_up_proj, c.kv_lora_rank,
                                              H * (self.dn + self.dv), **col, tp_comm_buffer_name="kv_up_proj")
        self.linear_proj = build_module(submodules.linear_proj, H * self.dv, c.hidden_size, config=c,
                                        init_method=c.output_layer_init_method, bias=False,
                                        input_is_parallel=True, skip_bias_add=True, is_expert=False,
                                        tp_comm_buffer_name="proj", tp_group=self.tp_group)
        self.softmax_scale = mla_softmax_scale(c)
        rs = c.rope_scaling
        self.rope_attention_factor = (
            yarn_mscale(rs["factor"], rs["mscale"]) / yarn_mscale(rs["factor"], rs["mscale_all_dim"])
            if rs is not None else 1.0)
        self.register_buffer("inv_freq", inverse_frequencies(self.dr, c.rope_theta, rs), persistent=False)
        self._tables: dict = {}         # per sequence length: RoPE cos / sin, the causal bias
        modules = set(c.recompute_modules or ()) if c.recompute_granularity == "selective" else set()
        self.recompute_up_proj = "mla_up_proj" in modules
        self.recompute_latent_norms = "layernorm" in modules and not self.recompute_up_proj
        self.recompute_core_attn = "core_attn" in modules

    def _shared_rope_key(self, k_pe: torch.Tensor) -> torch.Tensor:
        """Full-sequence k_pe on every TP rank, with gradients summed over the heads of all ranks."""
        if self.tp_size == 1:
            return k_pe
        if self.config.sequence_parallel:
            return gather_from_sequence_parallel_region(k_pe, group=self.tp_group)
        return copy_to_tensor_model_parallel_region(k_pe, group=self.tp_group)

    def _discarding_checkpoint(self):
        """Megatron's output-discarding checkpoint (FP8 context only when FP8/FP4 is on: its default
        ``fp8=False`` would ask for Transformer Engine)."""
        return tensor_parallel.CheckpointWithoutOutput(fp8=True if (self.config.fp8 or self.config.fp4) else None)

    def _up_projection(self, q_in: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor, norms: bool):
        """Latents -> query, key [s, b, H_l, dn+dr], value [s, b, H_l, dv] (fresh contiguous tensors).

        q_in: the q latent (q_lora_rank) or the hidden states (plain q_proj); k_pe: the full-sequence
        shared RoPE key [s, b, dr]. ``norms``: apply the latent RMSNorms here (else already applied).
        """
        if self.config.q_lora_rank is None:
            q, _ = self.linear_q_proj(q_in)
        else:
            q, _ = self.linear_q_up_proj(self.q_layernorm(q_in) if norms else q_in)
        kv, _ = self.linear_kv_up_proj(self.kv_layernorm(c_kv) if norms else c_kv)
        s, b = q.shape[0], q.shape[1]
        q_nope, q_pe = q.view(s, b, self.n_local_heads, self.dn + self.dr).split([self.dn, self.dr], dim=-1)
        k_nope, v = kv.view(s, b, self.n_local_heads, self.dn + self.dv).split([self.dn, self.dv], dim=-1)
        cos, sin = self._cos_sin(s)
        q_pe = apply_rope(q_pe.float(), cos, sin).to(q.dtype)
        k_pe = apply_rope(k_pe.unsqueeze(2).float(), cos, sin).to(q.dtype)
        query = torch.cat((q_nope, q_pe), dim=-1)
        key = torch.cat((k_nope, k_pe.expand(-1, -1, self.n_local_heads, -1)), dim=-1)
        return query, key, v.contiguous()

    def _cos_sin(self, s: int):
        """RoPE cos / sin [s, dr/2] (fp32) for positions 0..s-1, computed once per length and device."""
        key = (s, self.inv_freq.device)
        cached = self._tables.get(key)
        if cached is None:
            cached = self._tables[key] = cos_sin(s, self.inv_freq, self.rope_attention_factor, torch.float32)
        return cached

    def _dropout_rng(self):
        """Megatron's model-parallel RNG stream for the attention dropout. Under sequence parallelism
        the decoder block (and the MTP layer) already run inside it."""
        if self.config.sequence_parallel:
            return nullcontext()
        return tensor_parallel.get_cuda_rng_tracker().fork()

    def _core_attention(self, query, key, value, mask):
        """[s, b, H_l, *] -> [s, b, H_l * dv]: softmax(q k^T * scale, causal or ``mask``), dropout, @ v."""
        s, b = query.shape[0], query.shape[1]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))   # [b, H_l, s, d]
        p = self.config.attention_dropout if self.training else 0.0
        dq = self.dn + self.dr
        kernel = attention_kernel(q.device.type, dq, self.dv, s, p)
        if self.layer_number == 1:
            _log_kernel_once(kernel, q.device.type, dq, self.dv, s, p)
        if kernel == "explicit":
            bias = self._causal_bias(s, q) if mask is None else None
            out = _ExplicitAttention.apply(q, k, v, self.softmax_scale, bias, mask)
        else:
            out = self._sdpa(q, k, v, mask, p, padded=kernel == "sdpa_padded_v")
        return out.permute(2, 0, 1, 3).reshape(s, b, self.n_local_heads * self.dv)

    def _sdpa(self, q, k, v, mask, p: float, padded: bool):
        """torch's SDPA on [b, H_l, s, d]; ``padded``: V zero-padded to the q/k head size and the output
        sliced back (the CPU flash kernel)."""
        masking = dict(is_causal=True) if mask is None else dict(attn_mask=~mask)   # SDPA: True = attend
        if padded:
            v = F.pad(v, (0, q.shape[-1] - self.dv))
        if p > 0:
            with self._dropout_rng():
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=self.softmax_scale, **masking)
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.softmax_scale, **masking)
        return out[..., :self.dv] if padded else out

    def _causal_bias(self, s: int, like: torch.Tensor) -> torch.Tensor:
        """[s, s]: 0 on and below the diagonal, -inf above (cached per length, device and dtype)."""
        key = ("causal", s, like.device, like.dtype)
        bias = self._tables.get(key)
        if bias is None:
            bias = self._tables[key] = torch.full((s, s), float("-inf"), dtype=like.dtype,
                                                      device=like.device).triu(1)
        return bias

    @staticmethod
    def _check_mask(mask: Optional[torch.Tensor], batch: int, seq: int) -> None:
        if mask is None:
            return
        if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 \
                or mask.shape[0] not in (1, batch) or tuple(mask.shape[2:]) != (seq, seq):
            raise ValueError(
                f"MultiLatentAttention: attention_mask must be Megatron's bool [batch or 1, 1, {seq}, {seq}] "
                f"mask (True = masked, as GPTDataset builds it with create_attention_mask); got "
                f"{mask.dtype} {tuple(mask.shape)}")

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, key_value_states=None,
                inference_context=None, rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None,
                rotary_pos_cos_sin=None, attention_bias=None, packed_seq_params=None,
                sequence_len_offset=None, **_unused):
        """hidden_states [s_l, b, hidden] -> (output [s_l, b, hidden], None).

        attention_mask: None (causal) or Megatron's bool [b or 1, 1, s, s], True = masked.
        """
        if inference_context is not None or packed_seq_params is not None or key_value_states is not None:
            raise NotImplementedError("MultiLatentAttention: KV-cache inference, packed sequences and "
                                      "cross-attention are not supported yet")
        if attention_bias is not None:
            raise NotImplementedError("MultiLatentAttention: attention_bias is not supported")
        if self.config.q_lora_rank is None:
            q_in = hidden_states
        else:
            q_in, _ = self.linear_q_down_proj(hidden_states)
        kv_down, _ = self.linear_kv_down_proj(hidden_states)
        c_kv, k_pe = kv_down.split([self.config.kv_lora_rank, self.dr], dim=-1)
        k_pe = self._shared_rope_key(k_pe)
        self._check_mask(attention_mask, hidden_states.shape[1], k_pe.shape[0])

        checkpoints = []          # output-discarding: recomputed when the core's output gets its gradient
        training = self.training and torch.is_grad_enabled()
        if training and self.recompute_up_proj:
            up = self._discarding_checkpoint()
            query, key, value = up.checkpoint(lambda q_, c_, k_: self._up_projection(q_, c_, k_, True),
                                              q_in, c_kv, k_pe)
            checkpoints.append(up)
        else:
            if self.config.q_lora_rank is not None:
                q_in = self._norm(self.q_layernorm, q_in, training, checkpoints)
            c_kv = self._norm(self.kv_layernorm, c_kv, training, checkpoints)
            query, key, value = self._up_projection(q_in, c_kv, k_pe, False)

        if training and self.recompute_core_attn:
            out = tensor_parallel.checkpoint(self._core_attention, False, query, key, value, attention_mask)
        else:
            out = self._core_attention(query, key, value, attention_mask)
        for ckpt in checkpoints:
            ckpt.discard_output_and_register_recompute(out)
        return self.linear_proj(out)

    def _norm(self, norm, x, training: bool, checkpoints: list):
        if not (training and self.recompute_latent_norms):
            return norm(x)
        ckpt = self._discarding_checkpoint()
        checkpoints.append(ckpt)
        return ckpt.checkpoint(norm, x)
