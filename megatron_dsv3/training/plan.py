"""The planner behind ``dsv3-plan`` (tools/plan.py): size a DeepSeek-V3-family training run from the
launcher's own flags, before anything is launched.

    plan(["--dsv3-preset", "deepseek-v3", "--pipeline-model-parallel-size", "16", ...], nodes=256)

For the model (a preset or a HF config.json, with the launcher's overrides) and the layout (TP, PP,
EP, expert-TP, DP = world / (TP x PP), distributed optimizer, --pipeline-schedule, micro-batch size
and count, sequence length, recomputation, FP8, --ranks-per-node, --moe-token-dispatcher-type):

- parameters, exact: every tensor of the architecture (the router's expert bias included, the
  embedding and the untied head once each); the MTP modules apart, without their shared embedding /
  head; activated = total - the embedding (a token reads one row of it) - the (E - K) routed experts
  a token does not use, per MoE layer (DeepSeek's convention: V3 37B, V2 21B, V2-Lite 2.4B);
- FLOPs per token, forward + backward (3x forward), causal attention, MTP included: the count of
  :mod:`.flops`;
- memory per GPU, for every pipeline rank (the largest is ``memory_per_gpu_bytes``): weights,
  gradients, optimizer states (sharded over the data-parallel replicas with the distributed optimizer,
  ZeRO-1; experts over the expert-data-parallel ones), Transformer Engine's FP8 weight copies,
  activations (each (chunk, micro-batch) alive at once in the schedule's per-rank order, from
  :mod:`..parallel.schedules.order`, weighted by what one micro-batch leaves in that chunk's layers;
  DualPipe's two chunks per rank are two parameter copies), one MoE layer's dispatcher buffers, and
  an imbalance margin on everything routed experts hold; plus a fixed reserve (CUDA context, NCCL);
- the pipeline bubble fraction from the schedule simulator (:mod:`..parallel.schedules.simulate`);
- all-to-all bytes per step and GPU across nodes (IB) and inside them (NVLink), routing with and
  without the node limit M, for Megatron's flat alltoall and for the node_limited dispatcher (copies
  per token from ``tools/bench_dispatch.py``'s Monte-Carlo ``estimate``);
- the launch checks that need no machine (the launcher's own functions: flags, numbers, parallel
  layout, world and batch, dispatcher, schedule, FP8 flags), each refusal naming the flag to change;
  the ones that need the cluster (Transformer Engine / GPU, tokenizer, data, checkpoints) are listed.

Activation bytes per layer and micro-batch (t tokens = seq x micro-batch, t_l = t / TP under sequence
parallelism, a = bytes of the training dtype, c8 = 1 + 4/128 bytes of an FP8 element with its 1x128
scale; "lin(n)" = n elements cached as a linear layer's input: c8 with --fp8-format, else a):
see :func:`layer_activations` (each term is named in the JSON).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import math
import os
import sys
from dataclasses import dataclass
from typing import Optional

from ..config.mapping import flag_name

#: The report's training cost (sec. 1 / Table 1): H800 GPU hours per trillion tokens.
REPORT_GPU_HOURS_PER_T = 180_000
#: Per-GPU bandwidths of the report's cluster (sec. 3.2.2: IB 50 GB/s, NVLink 160 GB/s).
IB_GBS, NVLINK_GBS = 50.0, 160.0
C8 = 1 + 4 / 128           # FP8 element + its fp32 scale per 128
#: Total memory an 80 GB H800 / H100 SXM reports (torch.cuda.get_device_properties / nvidia-smi: 81,559 MiB).
H800_MIB = 81559
#: Sequence length planned when --seq-length is not given (DeepSeek V2 and V3 pretrain at 4K).
DEFAULT_SEQ = 4096

_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}


class PlanError(ValueError):
    """The planner cannot read the model or the flags (the message names the flag)."""


# ----------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tensor:
    """One parameter tensor family of a layer: elements, how it is split, FP8 GEMM or not, bytes."""

    name: str
    numel: int
    split: str          # "tp" (split over TP), "rep" (replicated on TP ranks), "vocab" (vocab-split), "expert"
    fp8: bool = False   # a GEMM weight that --fp8-format runs in FP8
    fp32: bool = False  # kept in fp32 whatever the training dtype (router weight, expert bias)


def attention_tensors(c) -> list[Tensor]:
    h, H = c.hidden_size, c.num_attention_heads
    dn, dr, dv, rkv = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
    out = [Tensor("input_layernorm", h, "rep")]
    if c.q_lora_rank is None:
        out.append(Tensor("q_proj", h * H * (dn + dr), "tp", fp8=True))
    else:
        rq = c.q_lora_rank
        out += [Tensor("q_down", h * rq, "rep", fp8=True), Tensor("q_norm", rq, "rep"),
                Tensor("q_up", rq * H * (dn + dr), "tp", fp8=True)]
    out += [Tensor("kv_down", h * (rkv + dr), "rep", fp8=True), Tensor("kv_norm", rkv, "rep"),
            Tensor("kv_up", rkv * H * (dn + dv), "tp", fp8=True), Tensor("o_proj", H * dv * h, "tp", fp8=True),
            Tensor("pre_mlp_layernorm", h, "rep")]
    return out


def ffn_tensors(c, moe: bool) -> list[Tensor]:
    h = c.hidden_size
    if not moe:
        return [Tensor("dense_fc1", 2 * h * c.ffn_hidden_size, "tp", fp8=True),
                Tensor("dense_fc2", c.ffn_hidden_size * h, "tp", fp8=True)]
    E, I, S = c.n_routed_experts, c.moe_intermediate_size, c.n_shared_experts or 0
    out = [Tensor("router", E * h, "rep", fp32=True)]
    if c.scoring_func == "sigmoid":
        out.append(Tensor("expert_bias", E, "rep", fp32=True))
    out.append(Tensor("routed_experts", E * 3 * h * I, "expert", fp8=True))
    if S:
        out.append(Tensor("shared_experts", 3 * h * S * I, "tp", fp8=True))
    return out


def layer_tensors(c, moe: bool) -> list[Tensor]:
    return attention_tensors(c) + ffn_tensors(c, moe)


def mtp_tensors(c) -> list[Tensor]:
    """One MTP depth, without the embedding and head it shares with the main model."""
    h = c.hidden_size
    return ([Tensor("mtp_enorm", h, "rep"), Tensor("mtp_hnorm", h, "rep"), Tensor("mtp_eh_proj", 2 * h * h, "rep"),
             Tensor("mtp_final_layernorm", h, "rep")] + layer_tensors(c, moe=True))


def parameter_counts(c) -> dict:
    """Exact element counts of the architecture (see the module doc)."""
    h, V, L = c.hidden_size, c.vocab_size, c.num_layers
    moe_layers = [i for i in range(L) if c.is_moe_layer(i)]
    layers = sum(t.numel for i in range(L) for t in layer_tensors(c, i in moe_layers))
    main = V * h + layers + h + V * h
    D = c.mtp_num_layers or 0
    mtp = D * sum(t.numel for t in mtp_tensors(c))
    unused = 0
    if moe_layers:
        per_expert = 3 * h * c.moe_intermediate_size
        unused = (c.n_routed_experts - c.num_experts_per_tok) * per_expert
    return {
        "total_params": main, "mtp_params": mtp,
        "activated_params": main - V * h - len(moe_layers) * unused,
        "mtp_activated_params": mtp - D * unused if D else 0,
        "embedding": V * h, "output_head": V * h, "final_layernorm": h,
        "decoder_layers": layers, "moe_layers": len(moe_layers), "dense_layers": L - len(moe_layers),
        "routed_experts": len(moe_layers) * c.n_routed_experts * 3 * h * c.moe_intermediate_size if moe_layers else 0,
    }


# ----------------------------------------------------------------------------------------------
# The layout
# ----------------------------------------------------------------------------------------------
@dataclass
class Layout:
    world: int
    ranks_per_node: int
    tp: int
    pp: int
    ep: int
    etp: int
    cp: int
    dp: int
    edp: int
    sequence_parallel: bool
    distributed_optimizer: bool
    schedule: str               # order.py name: 1f1b | interleaved | dualpipe | dualpipev
    vp: int
    micro_batch: int
    micro_batches: int
    global_batch: int
    seq: int
    dtype: str                  # fp32 | bf16 | fp16
    fp8: Optional[str]
    fp8_recipe: str
    fp8_emulation: bool
    dispatch_fp8: bool
    dispatcher: str
    recompute_granularity: Optional[str]
    recompute_method: Optional[str]
    recompute_num_layers: Optional[int]
    recompute_modules: tuple
    fp8_swiglu_input: bool
    main_grads: str
    fp8_params: bool
    te_cross_entropy: bool
    main_params: str
    exp_avg: str
    exp_avg_sq: str


def _schedule_name(args) -> tuple[str, int]:
    vp = None
    if getattr(args, "num_layers_per_virtual_pipeline_stage", None):
        vp = args.num_layers // args.pipeline_model_parallel_size // args.num_layers_per_virtual_pipeline_stage
    vp = vp or getattr(args, "num_virtual_stages_per_pipeline_rank", None) or \
        getattr(args, "virtual_pipeline_model_parallel_size", None) or 1
    name = args.pipeline_schedule
    if name == "1f1b" and vp > 1:
        name = "interleaved"
    return name, vp


def layout_from_args(args, fields: dict, world: int, ranks_per_node: int) -> Layout:
    tp, pp, cp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size
    ep = args.expert_model_parallel_size
    etp = args.expert_tensor_parallel_size or tp
    dp = max(1, world // (tp * pp * cp))
    edp = max(1, world // (etp * ep * pp))
    mbs = args.micro_batch_size or 1
    gbs = args.global_batch_size or mbs * dp
    schedule, vp = _schedule_name(args)
    dtype = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    modules = ()
    if args.recompute_activations or args.recompute_granularity == "selective":
        modules = tuple(args.recompute_modules if args.recompute_modules is not None else ["core_attn"])
        modules += ("moe",) if args.moe_layer_recompute else ()
    grads = "fp32" if dtype == "fp32" else ("bf16" if args.grad_reduce_in_bf16 else str(args.main_grads_dtype))
    precise = bool(getattr(args, "use_precision_aware_optimizer", False))
    return Layout(
        world=world, ranks_per_node=ranks_per_node, tp=tp, pp=pp, ep=ep, etp=etp, cp=cp, dp=dp, edp=edp,
        sequence_parallel=bool(args.sequence_parallel) and tp > 1,
        distributed_optimizer=bool(args.use_distributed_optimizer), schedule=schedule, vp=vp, micro_batch=mbs,
        micro_batches=max(1, gbs // (mbs * dp)), global_batch=gbs, seq=args.seq_length, dtype=dtype,
        fp8=args.fp8, fp8_recipe=args.fp8_recipe, fp8_emulation=bool(getattr(args, "fp8_emulation", False)),
        dispatch_fp8=bool(getattr(args, "moe_dispatch_fp8", False)), dispatcher=args.moe_token_dispatcher_type,
        recompute_granularity=args.recompute_granularity, recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers, recompute_modules=modules,
        fp8_swiglu_input=bool(getattr(args, "activation_func_fp8_input_store", False)),
        main_grads=grads, fp8_params=bool(args.fp8_param_gather) and args.fp8 is not None, te_cross_entropy=bool(args.cross_entropy_loss_fusion)
        and args.cross_entropy_fusion_impl == "te", main_params=str(args.main_params_dtype) if precise else "fp32",
        exp_avg=str(args.exp_avg_dtype) if precise else "fp32",
        exp_avg_sq=str(args.exp_avg_sq_dtype) if precise else "fp32")


def stage_layers(c, args, n_stages: int) -> list[list[int]]:
    """Global decoder-layer indices of each pipeline stage, as Megatron-Core splits them (even, or
    --decoder-first/last-pipeline-num-layers); an uneven split the launch refuses is planned with the
    extra layers on the first stages."""
    L = c.num_layers
    first = getattr(args, "decoder_first_pipeline_num_layers", None)
    last = getattr(args, "decoder_last_pipeline_num_layers", None)
    counts = None
    if (first or last) and n_stages > 1:
        middle = n_stages - (1 if first else 0) - (1 if last else 0)
        rest = L - (first or 0) - (last or 0)
        if middle > 0 and rest >= 0 and rest % middle == 0:
            counts = ([first] if first else []) + [rest // middle] * middle + ([last] if last else [])
        elif middle == 0 and rest == 0:
            counts = [x for x in (first, last) if x]
    if counts is None:
        base, extra = divmod(L, n_stages)
        counts = [base + (1 if s < extra else 0) for s in range(n_stages)]
    out, at = [], 0
    for n in counts:
        out.append(list(range(at, at + n)))
        at += n
    return out


# ----------------------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------------------
def layer_activations(c, lay: Layout, moe: bool, imbalance: float) -> dict:
    """Bytes one micro-batch leaves saved for backward in one decoder layer (see the module doc)."""
    a = _DTYPE_BYTES[lay.dtype]
    fp8 = lay.fp8 is not None
    t = lay.seq * lay.micro_batch
    tl = t // lay.tp if lay.sequence_parallel else t
    Hl = c.num_attention_heads // lay.tp
    h, dn, dr, dv, rkv = c.hidden_size, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
    rec = set(lay.recompute_modules)
    swiglu_in = C8 if (fp8 and lay.fp8_swiglu_input) else a      # --activation-func-fp8-input-store

    def lin(n, consumers=1):
        return n * C8 * consumers if fp8 else n * a

    out = {}
    if lay.recompute_granularity == "full":
        out["layer_input (full recompute: only the checkpoint input)"] = tl * h * a
        return out
    norm_recomputed = "layernorm" in rec
    up_recomputed = "mla_up_proj" in rec
    out["attn_norm_in"] = tl * h * a
    if fp8:
        out["attn_norm_out (FP8 copies of q_down / kv_down)"] = lin(tl * h, 2)
    elif not norm_recomputed:
        out["attn_norm_out"] = tl * h * a
    if c.q_lora_rank is not None:
        out["q_latent"] = tl * c.q_lora_rank * a
        if not up_recomputed and (fp8 or not norm_recomputed):
            out["q_up_in"] = lin(tl * c.q_lora_rank)
    out["kv_latent"] = tl * (rkv + dr) * a
    if not up_recomputed and (fp8 or not norm_recomputed):
        out["kv_up_in"] = lin(tl * rkv)
    if not up_recomputed:
        out["q_k_v"] = t * Hl * (2 * (dn + dr) + dv) * a
    if "core_attn" not in rec:
        out["attn_out"] = t * Hl * dv * a
        out["attn_lse"] = t * Hl * 4
    if fp8:
        out["o_proj_in (FP8)"] = lin(t * Hl * dv)
    out["mlp_norm_in"] = tl * h * a
    if not norm_recomputed:
        out["mlp_norm_out"] = tl * h * a
    if not moe:
        F = c.ffn_hidden_size // lay.tp
        if fp8:
            out["dense_fc1_in (FP8)"] = lin(tl * h)
        if "mlp" not in rec:
            out["dense_fc1_out"] = t * 2 * F * swiglu_in
            out["dense_fc2_in"] = lin(t * F)
        return out
    if "moe" in rec:
        return out
    E, K, I = c.n_routed_experts, c.num_experts_per_tok, c.moe_intermediate_size
    out["router_scores (fp32)"] = 2 * tl * E * 4
    routed = tl * K * lay.etp * (1 + imbalance)           # tokens this rank's experts receive
    Il = I // lay.etp
    out["experts_fc1_in"] = routed * h * (C8 if (fp8 or lay.dispatch_fp8) else a)
    out["experts_fc1_out"] = routed * 2 * Il * swiglu_in
    if "moe_act" not in rec:
        out["experts_fc2_in"] = lin(routed * Il)
    out["expert_probs"] = routed * 4
    S = c.n_shared_experts or 0
    if S and "shared_experts" not in rec:
        SI = S * I // lay.tp
        if fp8:
            out["shared_fc1_in (FP8)"] = lin(tl * h)
        out["shared_fc1_out"] = t * 2 * SI * swiglu_in
        out["shared_fc2_in"] = lin(t * SI)
    return out


def _stage_activation_bytes(c, lay, layers: list[int], imbalance: float, *, first: bool, last: bool,
                            mtp: int) -> dict:
    """Bytes one micro-batch leaves in one stage (chunk), by part."""
    a = _DTYPE_BYTES[lay.dtype]
    t = lay.seq * lay.micro_batch
    tl = t // lay.tp if lay.sequence_parallel else t
    parts = {}
    if lay.recompute_granularity == "full":
        n = lay.recompute_num_layers or 1
        normal, checkpoint_input = _no_full(lay), tl * c.hidden_size * a
        if lay.recompute_method == "block":     # the first n layers of the stage keep only their input
            parts["decoder_layers"] = sum(
                checkpoint_input if i < n else sum(layer_activations(c, normal, c.is_moe_layer(layer), imbalance).values())
                for i, layer in enumerate(layers))
        else:                                   # uniform: one checkpoint input per group of n layers
            parts["decoder_layers"] = math.ceil(len(layers) / n) * checkpoint_input
    else:
        per = {moe: sum(layer_activations(c, lay, moe, imbalance).values())
               for moe in {c.is_moe_layer(i) for i in layers}}
        parts["decoder_layers"] = sum(per[c.is_moe_layer(i)] for i in layers)
    if last:
        V = c.vocab_size // lay.tp
        parts["final_norm_and_head_in"] = 2 * tl * c.hidden_size * a
        # Megatron-Core's cross entropy saves the fp32 softmax; Transformer Engine's fused one
        # (--cross-entropy-loss-fusion --cross-entropy-fusion-impl te) the gradient in the logits' dtype
        parts["loss_softmax (main + MTP heads)"] = (1 + mtp) * t * V * (a if lay.te_cross_entropy else 4)
        if mtp:
            mtp_layer = sum(layer_activations(c, _no_full(lay) if lay.recompute_granularity == "full" else lay,
                                              True, imbalance).values())
            parts["mtp_layers"] = mtp * (mtp_layer + 5 * tl * c.hidden_size * a)
    return parts


def _no_full(lay: Layout) -> Layout:
    import dataclasses

    return dataclasses.replace(lay, recompute_granularity=None)


# ----------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------
def _chunk_params(c, lay: Layout, layers: list[int], *, first: bool, last: bool, mtp: int, pp_multi: bool) -> dict:
    """Elements of one stage held by one rank: {'dense', 'expert', 'fp8_dense', 'fp8_expert', 'fp32'}."""
    out = dict.fromkeys(("dense", "expert", "fp8_dense", "fp8_expert", "fp32"), 0)

    def add(tensors):
        for t in tensors:
            if t.split == "expert":
                n = t.numel // lay.ep // lay.etp
                out["expert"] += n
                out["fp8_expert"] += n if t.fp8 else 0
                continue
            n = t.numel // lay.tp if t.split in ("tp", "vocab") else t.numel
            out["dense"] += n
            out["fp8_dense"] += n if t.fp8 else 0
            out["fp32"] += n if t.fp32 else 0

    h, V = c.hidden_size, c.vocab_size
    for i in layers:
        add(layer_tensors(c, c.is_moe_layer(i)))
    if first:
        add([Tensor("embedding", V * h, "vocab")])
    if last:
        add([Tensor("final_layernorm", h, "rep"), Tensor("output_head", V * h, "vocab")])
        if mtp:
            add(mtp_tensors(c) * mtp)
            if pp_multi and not first:   # the MTP stage builds its own copy of the shared embedding
                add([Tensor("embedding_copy_for_mtp", V * h, "vocab")])
    return out


def rank_memory(c, lay: Layout, ranks_chunks: list[list[tuple[int, int]]], stage_of, schedule_ops,
                imbalance: float, reserve_bytes: float) -> list[dict]:
    """Memory of every pipeline rank, by part (bytes)."""
    a = _DTYPE_BYTES[lay.dtype]
    mtp = c.mtp_num_layers or 0
    n_stages = len(stage_of)
    out = []
    for r, chunks in enumerate(ranks_chunks):
        held = dict.fromkeys(("dense", "expert", "fp8_dense", "fp8_expert", "fp32"), 0)
        chunk_act = {}
        for chunk, stage in chunks:
            first, last = stage == 0, stage == n_stages - 1
            p = _chunk_params(c, lay, stage_of[stage], first=first, last=last, mtp=mtp, pp_multi=n_stages > 1)
            for k in held:
                held[k] += p[k]
            chunk_act[chunk] = sum(_stage_activation_bytes(c, lay, stage_of[stage], imbalance, first=first,
                                                           last=last, mtp=mtp).values())
        params = held["dense"] + held["expert"]
        fp8_params = held["fp8_dense"] + held["fp8_expert"] if lay.fp8 is not None else 0
        # --fp8-param-gather: the FP8 GEMM weights are Transformer Engine FP8 tensors (counted below), no
        # training-dtype copy
        weights = (params - held["fp32"] - (fp8_params if lay.fp8_params else 0)) * a + held["fp32"] * 4
        grads = params * (4 if lay.dtype == "fp32" else _DTYPE_BYTES[lay.main_grads])
        opt_bytes = _DTYPE_BYTES[lay.exp_avg] + _DTYPE_BYTES[lay.exp_avg_sq]
        if lay.dtype != "fp32":
            opt_bytes += _DTYPE_BYTES[lay.main_params]
        dense_shard = lay.dp if lay.distributed_optimizer else 1
        expert_shard = lay.edp if lay.distributed_optimizer else 1
        optimizer = opt_bytes * (held["dense"] / dense_shard + held["expert"] / expert_shard)
        fp8_copies = 2 * fp8_params          # row- and column-wise FP8 data of each FP8 GEMM weight
        live = _weighted_peak(schedule_ops[r], chunk_act) if schedule_ops else chunk_act.get(0, 0)
        t = lay.seq * lay.micro_batch
        tl = t // lay.tp if lay.sequence_parallel else t
        dispatch = 0.0
        if c.has_moe:
            per_copy = c.hidden_size * ((C8 if lay.dispatch_fp8 or lay.fp8 else a) + a)
            dispatch = 2 * tl * c.num_experts_per_tok * (1 + imbalance) * per_copy
        transient = 0.0
        if lay.recompute_granularity == "full":      # one checkpointed group re-materialised in backward
            group = lay.recompute_num_layers or 1
            transient = group * max(sum(layer_activations(c, _no_full(lay), moe, imbalance).values())
                                    for moe in ((True, False) if c.has_moe else (False,)))
        parts = {"weights": weights, "gradients": grads, "optimizer_states": optimizer,
                 "fp8_weight_copies": fp8_copies, "activations": live, "dispatcher_buffers": dispatch,
                 "recompute_buffer": transient, "reserve": reserve_bytes}
        out.append({"rank": r, "stages": [s for _, s in chunks], "params": params,
                    "layers": sum(len(stage_of[s]) for _, s in chunks), "bytes": parts,
                    "total_bytes": sum(parts.values())})
    return out


def _weighted_peak(rank_ops: list[str], chunk_bytes: dict) -> float:
    """Largest sum of the activation bytes alive on a rank over its operation order: a (chunk,
    micro-batch) is alive from its forward to the end of its (input-grad) backward, as the simulator's
    activation count (simulate.py) is, weighted by what the chunk holds."""
    from ..parallel.schedules.order import parse

    live = peak = 0.0
    for op in rank_ops:
        parts = parse(op)
        live += sum(chunk_bytes[p.chunk] for p in parts if p.kind == "F")
        peak = max(peak, live)
        live -= sum(chunk_bytes[p.chunk] for p in parts if p.kind in ("B", "Bi"))
    return peak


# ----------------------------------------------------------------------------------------------
# All-to-all
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _dispatch_estimate():
    """``estimate`` of tools/bench_dispatch.py (a source checkout), or None."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(root, "tools", "bench_dispatch.py")
    if not os.path.exists(path):
        return None
    spec = importlib.util.spec_from_file_location("_dsv3_bench_dispatch", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.estimate


def all_to_all(c, lay: Layout, ranks_chunks, stage_of, tokens: int = 20000) -> Optional[dict]:
    """Bytes per step and GPU sent over IB (other nodes) and NVLink (own node) by the MoE layers."""
    if not c.has_moe or lay.ep == 1:
        return None
    from ..parallel.topology import TopologyError, expert_parallel_groups, node_layout

    try:
        ranks = expert_parallel_groups(lay.world, tp=lay.tp, pp=lay.pp, ep=lay.ep, etp=lay.etp, cp=lay.cp)[0]
        nodes = node_layout(ranks, lay.ranks_per_node)
    except TopologyError as e:
        return {"unavailable": str(e)}
    estimate = _dispatch_estimate()
    if estimate is None:
        return {"unavailable": "tools/bench_dispatch.py not found (a source checkout has it)"}
    N, R = nodes.num_nodes, nodes.local_size
    if c.n_routed_experts % (N * R):
        return {"unavailable": f"{c.n_routed_experts} experts do not divide over {N * R} EP ranks"}
    a = _DTYPE_BYTES[lay.dtype]
    h = c.hidden_size
    dispatch = h + 4 * math.ceil(h / 128) if lay.dispatch_fp8 else a * h
    per_copy = dispatch + a * h + 2 * a * h         # forward dispatch + combine, backward both in the dtype
    t = lay.seq * lay.micro_batch
    tl = t // lay.tp if lay.sequence_parallel else t
    mb_per_chunk = lay.micro_batches // (2 if lay.schedule == "dualpipe" else 1)
    # MoE layers a micro-batch passes on the busiest rank, summed over its chunks
    passes = max(sum(sum(c.is_moe_layer(i) for i in stage_of[s]) + ((c.mtp_num_layers or 0) if s == len(stage_of) - 1
                     else 0) for _, s in chunks) for chunks in ranks_chunks)
    tokens_per_step = passes * mb_per_chunk * tl
    out = {"ep_nodes": N, "ep_ranks_per_node": R, "moe_layer_passes_per_micro_batch": passes,
           "micro_batches_per_chunk": mb_per_chunk, "bytes_per_copy": per_copy,
           "ib_GBps": IB_GBS, "nvlink_GBps": NVLINK_GBS}
    limits = {"node_limited_routing": min(c.topk_group, N) if c.n_group == N else None, "unlimited_routing": N}
    for name, M in limits.items():
        if M is None:
            out[name] = {"unavailable": f"the routing groups (n_group {c.n_group}) are not the {N} nodes"}
            continue
        e = estimate(experts=c.n_routed_experts, topk=c.num_experts_per_tok, nodes=N, ranks_per_node=R,
                     node_limit=M, hidden=h, tokens=tokens)
        entry = {"node_limit": M, "max_nodes_per_token": e["max_nodes_per_token"]}
        for kind in ("flat", "node_limited"):
            ib = e[f"ib_copies_per_token_{kind}"] * tokens_per_step * per_copy
            nv = e[f"nvlink_copies_per_token_{kind}"] * tokens_per_step * per_copy
            entry[kind] = {"ib_copies_per_token": e[f"ib_copies_per_token_{kind}"],
                           "nvlink_copies_per_token": e[f"nvlink_copies_per_token_{kind}"],
                           "ib_bytes_per_step": ib, "nvlink_bytes_per_step": nv,
                           "ib_seconds_per_step": ib / (IB_GBS * 1e9), "nvlink_seconds_per_step": nv / (NVLINK_GBS * 1e9)}
        out[name] = entry
    out["dispatcher"] = "node_limited" if lay.dispatcher == "node_limited" else "flat"
    return out


# ----------------------------------------------------------------------------------------------
# Launch checks (the launcher's functions; those needing the cluster are listed, not run)
# ----------------------------------------------------------------------------------------------
MACHINE_CHECKS = ("Transformer Engine installed and its version / the GPU's FP8 support (--fp8-format)",
                  "ninja + a C++ compiler (--recompute-modules mla_up_proj / layernorm)",
                  "Transformer Engine or Apex for --use-distributed-optimizer with --load",
                  "tokenizer files, data files and token ids", "checkpoint directories (--load / --save)")


@contextlib.contextmanager
def _env(**values):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def launch_problems(args, given: set, fields: dict, world: int, ranks_per_node: int) -> tuple[list[str], list[str]]:
    """(refusals of the launch checks that need no machine, notes on the machine checks)."""
    from . import checks
    from .arguments import LaunchError
    from .fp8 import fp8_flag_problems

    uses_te = args.fp8 is not None or (args.transformer_impl == "transformer_engine" and not args.cpu)
    problems, notes = [], []
    runs = [lambda: checks._check_fixed_and_unsupported(args, given), lambda: checks.check_flags(args, given, fields),
            lambda: checks._check_numbers(args, fields), lambda: checks._check_parallel(args, fields),
            lambda: checks._check_attention_features(args), lambda: checks._check_world_and_batch(args),
            lambda: checks._check_registry(args), lambda: checks._check_dispatcher(args, fields),
            lambda: checks._check_schedule(args, fields)]
    with _env(WORLD_SIZE=world, LOCAL_WORLD_SIZE=ranks_per_node, RANK=0):
        for run in runs:
            try:
                run()
            except LaunchError as e:
                msg = str(e.code).removeprefix("dsv3-pretrain: error: ")
                if "ninja" in msg or (uses_te and "Transformer Engine" in msg and "install" in msg.lower()):
                    notes.append(f"on the cluster: {msg}")
                else:
                    problems.append(msg)
    problems += fp8_flag_problems(args, given)
    problems += _ramp_problems(args, world)
    return problems, notes


def _ramp_problems(args, world: int) -> list[str]:
    """Every batch size of --rampup-batch-size must also suit the schedule's micro-batch rule (the
    schedule's own check reads --global-batch-size only)."""
    from ..parallel.schedules import order

    ramp = getattr(args, "rampup_batch_size", None)
    name = args.pipeline_schedule
    if not ramp or name not in order.SCHEDULES or args.pipeline_model_parallel_size == 1:
        return []
    start, step, _ = (int(x) for x in ramp)
    dp = world // (args.tensor_model_parallel_size * args.pipeline_model_parallel_size * args.context_parallel_size)
    mbs, end = args.micro_batch_size or 1, args.global_batch_size or start
    for batch in range(start, end + 1, max(1, step)):
        if batch % (mbs * dp):
            return [f"--rampup-batch-size {start} {step} ...: a global batch of {batch} is not a multiple of "
                    f"--micro-batch-size {mbs} x data-parallel size {dp}"]
        try:
            order.validate(name, args.pipeline_model_parallel_size, batch // (mbs * dp))
        except order.OrderError as e:
            return [f"--rampup-batch-size {start} {step} ...: a global batch of {batch} is {batch // (mbs * dp)} "
                    f"micro-batches per step (data-parallel size {dp}); {e}"]
    return []


# ----------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------
PLANNER_FLAGS = ("--nodes", "--world-size", "--gpu-memory-mib", "--imbalance-margin", "--reserve-gb", "--mfu",
                 "--device", "--json", "--check", "--preset", "--hf-config")


def planner_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--preset", dest="dsv3_preset_alias", default=None)
    ap.add_argument("--hf-config", dest="dsv3_hf_config_alias", default=None)
    ap.add_argument("--nodes", type=int, default=None)
    ap.add_argument("--world-size", type=int, default=None)
    ap.add_argument("--gpu-memory-mib", type=float, default=H800_MIB)
    ap.add_argument("--imbalance-margin", type=float, default=0.25)
    ap.add_argument("--reserve-gb", type=float, default=3.0)
    ap.add_argument("--mfu", type=float, default=None)
    ap.add_argument("--device", default="H800")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--check", action="store_true")
    return ap


def plan(argv: list[str], **options) -> dict:
    """The plan of a launch given by the launcher's flags ``argv`` (plus the planner's own: --nodes or
    --world-size, --gpu-memory-mib, --imbalance-margin, --reserve-gb, --mfu, --device; keywords of the
    same names override them). Returns the JSON-able dict the CLI prints."""
    own, rest = planner_parser().parse_known_args(list(argv))
    for k, v in options.items():
        setattr(own, k, v)
    if own.dsv3_preset_alias:
        rest += ["--dsv3-preset", own.dsv3_preset_alias]
    if own.dsv3_hf_config_alias:
        rest += ["--dsv3-hf-config", own.dsv3_hf_config_alias]
    return _plan(rest, own)


def _world(args, own) -> tuple[int, int]:
    """(world size, ranks per node): --world-size, or --nodes x --ranks-per-node (default 8), or the
    smallest world holding the model-parallel sizes once (DP 1)."""
    rpn = args.ranks_per_node or 8
    if own.world_size and own.nodes and own.world_size != own.nodes * rpn:
        raise PlanError(f"--world-size {own.world_size} != --nodes {own.nodes} x --ranks-per-node {rpn}")
    if own.world_size:
        return own.world_size, rpn
    if own.nodes:
        return own.nodes * rpn, rpn
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    ep, etp = args.expert_model_parallel_size, args.expert_tensor_parallel_size or tp
    return math.lcm(tp * pp * args.context_parallel_size, etp * ep * pp), rpn


def _parse(argv, world):
    from .arguments import LaunchError, apply_recipe, parse

    with _env(WORLD_SIZE=world, RANK=0, LOCAL_RANK=0), contextlib.redirect_stdout(sys.stderr):
        try:
            args, given = parse(argv)
        except SystemExit as e:
            raise PlanError(str(e.code) if isinstance(e, LaunchError) else "the launcher's parser refused the flags "
                            "(see above)") from None
    apply_recipe(args, given)
    return args, given


def _fields(args, given) -> tuple[dict, list[str]]:
    """The DSv3 fields; training coefficients a config lacks get the paper's (they do not change the plan)."""
    from .arguments import LaunchError, resolve_model_fields

    notes = []
    fill = {"moe_router_bias_update_rate": 0.001, "mtp_loss_scaling_factor": 0.3, "moe_aux_loss_coeff": 0.0001}
    for _ in range(2):
        try:
            with _env(RANK=0), contextlib.redirect_stdout(sys.stderr):
                return resolve_model_fields(args, given), notes
        except LaunchError as e:
            msg = str(e.code)
            if "training coefficients" not in msg:
                raise PlanError(msg.removeprefix("dsv3-pretrain: error: ")) from None
            for dest, value in fill.items():
                if flag_name(dest) in msg and dest not in given:
                    setattr(args, dest, [value] if dest == "moe_aux_loss_coeff" else value)
                    given.add(dest)
                    notes.append(f"{flag_name(dest)} {value} assumed (not in the config; it does not change the plan)")
    raise PlanError("the model's training coefficients could not be resolved")


def _is_deepseek_v3(cfg) -> bool:
    """Is this the 671B architecture (the deepseek-v3 preset's shapes)?"""
    from ..config import PRESETS

    return all(getattr(cfg, k) == v for k, v in PRESETS["deepseek-v3"].items()
               if k not in ("mtp_lambda", "bias_update_rate", "seq_aux_alpha", "rope_scaling", "max_position_embeddings"))


def model_config(fields: dict, vocab_size: Optional[int] = None):
    """A world-1 DSv3Config of the fields (counting only; the layout is planned apart)."""
    from ..config import DSv3Config, cpu_overrides

    kw = dict(fields)
    if vocab_size is not None:
        kw["vocab_size"] = vocab_size
    kw.pop("ranks_per_node", None)
    return DSv3Config(**kw, **cpu_overrides(), perform_initialization=False)


def _plan(argv: list[str], own) -> dict:
    from ..parallel.schedules import order, simulate
    from . import flops as flops_mod

    args, given = _parse(argv, 1)
    world, rpn = _world(args, own)
    args.world_size, args.ranks_per_node = world, rpn
    assumed = []
    if args.seq_length is None:     # DeepSeek V2 / V3 pretrain at 4K (the deepseek-v3 preset's recipe sets it)
        args.seq_length = DEFAULT_SEQ
        assumed.append(f"--seq-length {DEFAULT_SEQ} assumed (not given)")
    if args.micro_batch_size is None:
        args.micro_batch_size = 1
        assumed.append("--micro-batch-size 1 assumed (not given)")
    if args.train_iters is None and args.train_samples is None:
        args.skip_train = True          # no training length given: the LR-schedule checks do not apply
    fields, notes = _fields(args, given)
    notes = assumed + notes
    vocab = args.vocab_size if "vocab_size" in given else fields.get("vocab_size")
    if vocab is None:
        raise PlanError("the model has no vocabulary size: give --vocab-size")
    cfg = model_config(fields, vocab)
    lay = layout_from_args(args, fields, world, rpn)
    problems, machine = launch_problems(args, given, fields, world, rpn)

    counts = parameter_counts(cfg)
    fl = flops_mod.model_flops(cfg, lay.seq)
    flops_per_token = 3 * fl["total"] / lay.seq

    # schedule: stages, what each rank holds, the order
    sched = lay.schedule if lay.pp > 1 else "1f1b"
    n_stages = order.stages(sched, lay.pp) if sched != "interleaved" else lay.pp * lay.vp
    stage_of = stage_layers(cfg, args, n_stages)
    bubble, sim, rank_ops, note = None, None, None, None
    if lay.pp > 1 and (sched != "interleaved" or lay.vp == 2):
        try:
            sim = simulate.simulate(sched, lay.pp, lay.micro_batches)
            rank_ops = order.ops(sched, lay.pp, lay.micro_batches)
            bubble = sim["bubble"] / sim["makespan"]
        except (order.OrderError, ValueError) as e:
            note = f"schedule simulator: {e}"
    elif lay.pp == 1:
        bubble = 0.0
    else:
        note = f"the simulator has interleaving with 2 virtual stages only (got {lay.vp})"
    at = order.layout(sched, lay.pp) if sched != "interleaved" or lay.vp == 2 else (lambda r, c: (0, c * lay.pp + r))
    per_rank = order.chunks_per_rank(sched) if sched != "interleaved" else lay.vp
    ranks_chunks = [[(c, at(r, c)[1]) for c in range(per_rank)] for r in range(lay.pp)]
    if rank_ops is None:     # no order: every chunk holds all its micro-batches (no pipelining) or PP of them
        alive = min(lay.micro_batches, lay.pp) if lay.pp > 1 else 1
        rank_ops = [[f"F{c}:{j}" for j in range(alive) for c, _ in chunks] for chunks in ranks_chunks]
    ranks = rank_memory(cfg, lay, ranks_chunks, stage_of, rank_ops, own.imbalance_margin, own.reserve_gb * 1e9)
    worst = max(ranks, key=lambda r: r["total_bytes"])
    capacity = own.gpu_memory_mib * 2 ** 20
    a2a = all_to_all(cfg, lay, ranks_chunks, stage_of)

    peak = flops_mod.PEAK_TFLOPS.get(f"{own.device} SXM", flops_mod.PEAK_TFLOPS.get(own.device))
    gpu_hours = None
    if peak and own.mfu:
        dense = peak["fp8" if lay.fp8 else "bf16"]
        gpu_hours = 1e12 * flops_per_token / (dense * 1e12 * own.mfu) / 3600
    implied = None
    if _is_deepseek_v3(cfg):     # the report's cost figure is for the 671B model
        implied = 1e12 * flops_per_token / (REPORT_GPU_HOURS_PER_T * 3600) / 1e12

    return {
        "model": args.dsv3_preset or args.dsv3_hf_config,
        "total_params": counts["total_params"], "activated_params": counts["activated_params"],
        "mtp_params": counts["mtp_params"], "mtp_activated_params": counts["mtp_activated_params"],
        "params_breakdown": counts,
        "flops_per_token": flops_per_token, "flops_per_token_breakdown_fwd": {k: v / lay.seq for k, v in fl.items()},
        "memory_per_gpu_bytes": worst["total_bytes"], "memory_worst_rank": worst["rank"],
        "memory_breakdown_bytes": worst["bytes"], "memory_per_rank": ranks,
        "activations_per_layer_bytes": {"moe": layer_activations(cfg, lay, True, own.imbalance_margin) if cfg.has_moe
                                        else None, "dense": layer_activations(cfg, lay, False, own.imbalance_margin)},
        "gpu_memory_bytes": capacity, "fits": worst["total_bytes"] <= capacity,
        "bubble_fraction": bubble,
        "schedule": {"name": sched, "pp": lay.pp, "micro_batches": lay.micro_batches, "stages": n_stages,
                     "layers_per_stage": [len(s) for s in stage_of],
                     "peak_activations_micro_batch_stages": sim["peak_activations"] if sim else None,
                     "param_copies": sim["param_copies"] if sim else 1,
                     "table2_bubble": simulate.table2_bubble(sched, lay.pp) if lay.pp > 1 else 0.0,
                     "note": note},
        "all_to_all": a2a,
        "layout": {k: v for k, v in vars(lay).items()},
        "runnable": not problems, "launch_problems": problems, "machine_checks": list(MACHINE_CHECKS) + machine,
        "notes": notes + [note] if note else notes,
        "device": own.device, "peak_tflops": peak,
        "gpu_hours_per_trillion_tokens": gpu_hours, "mfu_assumed": own.mfu,
        "report_gpu_hours_per_trillion_tokens": REPORT_GPU_HOURS_PER_T,
        "report_implied_tflops_per_gpu": implied,
    }


# ----------------------------------------------------------------------------------------------
# The human table
# ----------------------------------------------------------------------------------------------
def _b(x: float) -> str:
    return f"{x / 1e9:,.2f} GB"


def format_plan(p: dict) -> str:
    L = p["layout"]
    nodes = (f" = {L['world'] // L['ranks_per_node']} nodes x {L['ranks_per_node']}"
             if L["world"] % L["ranks_per_node"] == 0 else "")
    lines = [f"dsv3-plan: {p['model']}  ({L['world']} GPU{'s' if L['world'] > 1 else ''}{nodes})",
             f"layout   TP {L['tp']}  PP {L['pp']}  EP {L['ep']}  expert-TP {L['etp']}  DP {L['dp']}  expert-DP "
             f"{L['edp']}  ZeRO-1 {'on' if L['distributed_optimizer'] else 'off'}  schedule {p['schedule']['name']}  "
             f"micro-batch {L['micro_batch']} x {L['micro_batches']}  seq {L['seq']}  {L['dtype']}"
             + (f" + FP8 {L['fp8']}/{L['fp8_recipe']}" if L["fp8"] else "")
             + (f"  recompute {L['recompute_granularity']}:{','.join(L['recompute_modules'])}"
                if L["recompute_granularity"] else ""),
             "",
             f"parameters        total {p['total_params']:,}   activated {p['activated_params']:,}   "
             f"MTP {p['mtp_params']:,} (activated {p['mtp_activated_params']:,})",
             f"FLOPs per token   {p['flops_per_token']:.4e} (forward + backward, causal, MTP included)"]
    if p["report_implied_tflops_per_gpu"]:
        lines.append(f"                  the report's {p['report_gpu_hours_per_trillion_tokens']:,} GPU hours per 1T "
                     f"tokens = {p['report_implied_tflops_per_gpu']:.0f} TFLOP/s per GPU for this count")
    if p["gpu_hours_per_trillion_tokens"]:
        lines.append(f"                  at MFU {p['mfu_assumed']:.0%}: {p['gpu_hours_per_trillion_tokens']:,.0f} "
                     f"{p['device']} hours per 1T tokens")
    s = p["schedule"]
    bubble = "n/a" if p["bubble_fraction"] is None else f"{p['bubble_fraction']:.2%}"
    lines.append(f"pipeline          {s['stages']} stages, layers per stage {s['layers_per_stage']}; bubble {bubble}"
                 + (f"; peak activations {s['peak_activations_micro_batch_stages']} micro-batch-stages, "
                    f"parameter copies {s['param_copies']}" if s["peak_activations_micro_batch_stages"] else ""))
    lines += ["", f"memory per GPU (rank {p['memory_worst_rank']}, the largest of {len(p['memory_per_rank'])} "
                  f"pipeline ranks): {_b(p['memory_per_gpu_bytes'])} of {_b(p['gpu_memory_bytes'])} -> "
                  f"{'fits' if p['fits'] else 'DOES NOT FIT'}"]
    for k, v in p["memory_breakdown_bytes"].items():
        lines.append(f"  {k:<20} {_b(v):>12}")
    lines.append("  per rank: " + ", ".join(f"{r['rank']}:{r['total_bytes'] / 1e9:.1f}" for r in p["memory_per_rank"]))
    a = p["all_to_all"]
    if a and "unavailable" not in a:
        lines += ["", f"all-to-all per step and GPU (EP over {a['ep_nodes']} nodes x {a['ep_ranks_per_node']}; "
                      f"dispatch + combine, forward + backward; IB {a['ib_GBps']:.0f} GB/s, NVLink "
                      f"{a['nvlink_GBps']:.0f} GB/s):",
                  f"  {'routing':<22} {'dispatcher':<13} {'IB copies':>9} {'IB bytes':>12} {'IB s':>7} "
                  f"{'NVLink bytes':>13} {'NVL s':>7}"]
        for routing in ("node_limited_routing", "unlimited_routing"):
            e = a[routing]
            if "unavailable" in e:
                lines.append(f"  {routing:<22} {e['unavailable']}")
                continue
            for kind in ("flat", "node_limited"):
                x = e[kind]
                lines.append(f"  {routing + ' (M=' + str(e['node_limit']) + ')':<22} {kind:<13} "
                             f"{x['ib_copies_per_token']:>9.2f} {_b(x['ib_bytes_per_step']):>12} "
                             f"{x['ib_seconds_per_step']:>7.2f} {_b(x['nvlink_bytes_per_step']):>13} "
                             f"{x['nvlink_seconds_per_step']:>7.2f}")
    elif a:
        lines.append(f"all-to-all: {a['unavailable']}")
    lines.append("")
    if p["launch_problems"]:
        lines.append("CANNOT LAUNCH as given:")
        lines += [f"  - {m}" for m in p["launch_problems"]]
    else:
        lines.append("launch checks (no machine needed): pass")
    lines.append("checked at launch on the cluster: " + "; ".join(p["machine_checks"]))
    lines += [f"note: {n}" for n in p["notes"]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# dsv3-plan
# ----------------------------------------------------------------------------------------------
USAGE = """dsv3-plan: size a DeepSeek-V3 training run before launching it.

    dsv3-plan --preset deepseek-v3 --json                     # parameters, FLOPs per token
    dsv3-plan --hf-config path/to/config.json --seq-length 4096
    dsv3-plan --nodes 256 $(DSV3_PRINT_ARGS=1 bash examples/h800_dsv3_671b.sh)    # a recipe's exact flags

The layout is given with dsv3-pretrain's own flags (a recipe's flags pass unchanged). The planner's:
  --nodes N | --world-size N   GPUs = nodes x --ranks-per-node (default 8); default: the model-parallel
                               sizes once (DP 1)
  --gpu-memory-mib M           per-GPU memory (default 81559: an 80 GB H800 / H100 SXM)
  --imbalance-margin F         extra tokens on the busiest expert rank (default 0.25)
  --reserve-gb G               CUDA context, NCCL buffers, fragmentation (default 3)
  --mfu F --device NAME        GPU hours per 1T tokens at that MFU (device peaks: training/flops.py)
  --json                       one JSON object; --check: exit 1 when it cannot launch or does not fit
  --preset NAME | --hf-config PATH   = --dsv3-preset / --dsv3-hf-config
"""


def main(argv=None) -> int:
    import json
    import warnings

    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(USAGE)
        return 0
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    warnings.filterwarnings("ignore")
    try:
        p = plan(argv)
    except PlanError as e:
        print(f"dsv3-plan: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(p, default=str) if "--json" in argv else format_plan(p))
    if "--check" in argv and not (p["runnable"] and p["fits"]):
        return 1
    return 0
