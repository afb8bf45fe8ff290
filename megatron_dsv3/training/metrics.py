"""DeepSeek-V3 training metrics for the console and W&B (called by the launcher every iteration).

Megatron's own metrics stay as they are (console line; W&B: ``mtp_k loss``, ``seq_load_balancing_loss``
...). This module adds, under the names listed in :data:`METRICS` (also in the README):

- every iteration: the objective and its parts, lr, grad norm, throughput (tokens/s, TFLOP/s per
  device from the exact count in :mod:`megatron_dsv3.training.flops`, MFU when the device peak is known), and
  the current gamma / lambda of the token-keyed schedules;
- every ``--log-interval`` iterations: per-layer expert load (tokens per expert summed over all ranks
  that route for the layer), its max violation ``(max_e load - mean load) / mean load``, a heatmap
  image (layers x experts, load / mean), the expert biases (per expert for small models, min / max /
  std per layer otherwise, plus a heatmap), and the share of routed (token, expert) pairs whose expert
  sits on another node for ``--ranks-per-node`` (with the mean number of other nodes a token reaches).

Everything that needs a collective runs on every rank; only the last rank (Megatron's W&B rank)
writes.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from ..parallel.topology import cross_node_counts, expert_nodes
from .heatmaps import bias_heatmap, load_heatmap, save_png

#: W&B names written by megatron-dsv3 ({L}: 1-based decoder layer, MTP layers after the decoder; {e}: expert).
METRICS = {
    "train/loss": "lm loss + lambda/D * sum_k mtp_k loss + alpha * sum over MoE layers of the sequence "
                  "balance loss (needs W&B: the MTP and balance values are Megatron's W&B scalars)",
    "train/lm_loss": "cross-entropy of the main next-token head",
    "train/mtp_loss": "lambda/D * sum_k mtp_k loss (Megatron also logs each depth as 'mtp_k loss')",
    "train/seq_balance_loss": "alpha * sum over MoE layers of the sequence-wise balance loss",
    "train/lr": "learning rate", "train/grad_norm": "global gradient norm (before clipping)",
    "train/gamma": "expert-bias update speed in force", "train/mtp_lambda": "MTP weight in force",
    "perf/iteration_time_s": "training-step time (Megatron's interval timer: saves, evaluation excluded)",
    "perf/tokens_per_s": "global tokens / s",
    "perf/tflops_per_device": "exact model FLOPs (fwd+bwd, causal) / s / device",
    "perf/mfu": "tflops_per_device / device peak (only when the peak is known)",
    "moe/maxvio/layer_{L}": "(max load - mean load) / mean load of layer L over the log interval",
    "moe/maxvio_mean": "mean of the per-layer max violations", "moe/maxvio_max": "largest per-layer one",
    "moe/load_heatmap": "image: layers x experts, load / mean load (log2 colour scale, -2..2)",
    "moe/expert_bias/layer_{L}/expert_{e}": "expert bias (when layers x experts <= 1024)",
    "moe/expert_bias/layer_{L}/{min,max,std}": "bias summary per layer",
    "moe/bias_heatmap": "image: layers x experts expert bias",
    "moe/bias_replica_spread": "largest difference between replicas of one layer's bias over the ranks "
                               "that hold it (must be 0: they update from the same summed counts)",
    "moe/cross_node_share": "routed (token, expert) pairs whose expert is on another node",
    "moe/remote_nodes_per_token": "mean number of other nodes a token is sent to (the inter-node copies of "
                                  "node-limited dispatch)",
    "moe/remote_experts_per_token": "mean number of its experts a token has on other nodes (the inter-node "
                                    "copies of a flat all-to-all dispatch)",
    "moe/dispatch_bytes_cross_node": "bytes the registered dispatcher (node_limited) sent across nodes per "
                                     "iteration, all ranks, dispatch + combine",
    "moe/dispatch_bytes_intra_node": "bytes it sent inside nodes per iteration, all ranks",
}

_PER_EXPERT_LIMIT = 1024

#: Megatron internals read here (not patched): sha1 fingerprints checked by tests/test_patches.py.
RELIES_ON = {
    "megatron.core.timers:Timer": "4a62d30c6092",                                   # _active_time, _started, _start_time
    "megatron.core.transformer.multi_token_prediction:MTPLossLoggingHelper.track_mtp_metrics": "1ca62b1a62c5",  # 'mtp_k loss'
    "megatron.core.transformer.moe.moe_logging:MoEMetricsTracker.report": "4612d13aca6e",  # seq_load_balancing_loss
}


@dataclass
class _RouterCounts:
    """Tokens routed to each expert [E], and [assignments to experts on another node, distinct other
    nodes reached summed over tokens, tokens], since the last log."""

    load: torch.Tensor
    cross: torch.Tensor
    expert_node: Optional[torch.Tensor] = None
    own_node: int = -1
    n_nodes: int = 0


@dataclass
class _State:
    last_time: Optional[float] = None
    flops_per_iter: Optional[float] = None
    peak: Optional[float] = None
    told: set = field(default_factory=set)
    heatmap_dir: Optional[str] = None
    jsonl: Optional[str] = None
    config: object = None
    routers: dict = field(default_factory=dict)     # DSv3Router -> _RouterCounts
    #: bytes the dispatchers sent [cross-node, intra-node] since the last log, and the iterations
    dispatch_bytes: torch.Tensor = field(default_factory=lambda: torch.zeros(2, dtype=torch.float64))
    iterations_since_log: int = 0


_S = _State()


def install(args) -> None:
    """Register :func:`on_iteration` with the training_log hook."""
    from ..compat.patches import training_log_hook

    _S.peak = args.peak_tflops
    _S.heatmap_dir = os.path.join(args.save, "expert_load") if args.save else None
    _S.jsonl = args.metrics_jsonl
    if on_iteration not in training_log_hook.HOOKS:
        training_log_hook.HOOKS.append(on_iteration)


def attach(model) -> None:
    """Count expert load (and cross-node traffic when ``config.ranks_per_node`` is set) on every
    router of this model chunk, through forward hooks (training steps only)."""
    from megatron.core import parallel_state

    from ..model.router import DSv3Router

    _S.config = model.config
    rpn = model.config.ranks_per_node
    for module in model.modules():
        if not isinstance(module, DSv3Router):
            continue
        E = module.num_experts
        counts = _RouterCounts(load=torch.zeros(E), cross=torch.zeros(3))
        if rpn and torch.distributed.is_initialized():
            ep_ranks = torch.distributed.get_process_group_ranks(parallel_state.get_expert_model_parallel_group())
            counts.expert_node = expert_nodes(ep_ranks, E, rpn)
            counts.own_node = torch.distributed.get_rank() // rpn
            counts.n_nodes = max(int(counts.expert_node.max()), counts.own_node) + 1
        _S.routers[module] = counts
        module.register_forward_hook(_count)
    for module in model.modules():           # dispatchers that count their bytes (node_limited)
        dispatcher = getattr(module, "token_dispatcher", None)
        if dispatcher is not None and hasattr(dispatcher, "last_bytes"):
            module.register_forward_hook(_count_bytes)


def _count_bytes(moe_layer, inputs, output) -> None:
    if moe_layer.training and torch.is_grad_enabled():
        sent = moe_layer.token_dispatcher.last_bytes
        _S.dispatch_bytes += torch.tensor([float(sent["cross_node"]), float(sent["intra_node"])])


def _count(router, inputs, output) -> None:
    if not (router.training and torch.is_grad_enabled()):
        return
    _, routing_map = output
    counts = _S.routers[router]
    with torch.no_grad():
        counts.load += routing_map.sum(dim=0)
        if counts.expert_node is not None:
            counts.cross += cross_node_counts(routing_map, counts.expert_node, counts.own_node, counts.n_nodes)


# ----------------------------------------------------------------------------------------------
def _layer_id(router, config) -> int:
    return router.layer_number + (config.num_layers if router.is_mtp_layer else 0)


def collect_expert_stats(config, routing_group, pp_group) -> Optional[dict]:
    """Per-layer load / bias / cross-node counts since the last call, summed over ``routing_group``
    (the ranks that route for the same layers) and gathered over ``pp_group``. Resets the counters.
    Collective: every rank must call it."""
    routers = list(_S.routers)
    E = config.n_routed_experts
    n = len(routers)
    load = torch.stack([_S.routers[r].load for r in routers]) if n else torch.zeros(0, E)
    cross = torch.stack([_S.routers[r].cross for r in routers]) if n else torch.zeros(0, 3)
    spread = torch.zeros(n)
    several = torch.distributed.get_world_size(routing_group) > 1      # collectives only between ranks
    if n:
        if several:
            torch.distributed.all_reduce(load, group=routing_group)
            torch.distributed.all_reduce(cross, group=routing_group)
        for r in routers:
            _S.routers[r].load.zero_()
            _S.routers[r].cross.zero_()
        if routers[0].expert_bias is not None:   # every replica of a layer's bias must be identical
            bias = torch.stack([r.expert_bias.detach().float() for r in routers])
            hi, lo = bias.clone(), bias.clone()
            if several:
                torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX, group=routing_group)
                torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN, group=routing_group)
            spread = (hi - lo).amax(dim=1).cpu()
    payload = {
        _layer_id(r, config): {
            "load": load[i].cpu().numpy(),
            "bias": (r.expert_bias.detach().float().cpu().numpy() if r.expert_bias is not None else None),
            "cross": cross[i].cpu().numpy(),
            "spread": float(spread[i]),
        } for i, r in enumerate(routers)
    }
    gathered = [None] * torch.distributed.get_world_size(pp_group)
    if len(gathered) > 1:
        torch.distributed.all_gather_object(gathered, payload, group=pp_group)
    else:
        gathered = [payload]
    merged = {}
    for part in gathered:
        for layer, entry in part.items():
            if layer in merged:     # DualPipe: the two copies of a stage each route one direction's tokens
                merged[layer]["load"] = merged[layer]["load"] + entry["load"]
                merged[layer]["cross"] = merged[layer]["cross"] + entry["cross"]
                merged[layer]["spread"] = max(merged[layer]["spread"], entry["spread"])
            else:
                merged[layer] = entry
    return merged


def expert_scalars(stats: dict, per_expert: bool, with_cross: bool) -> dict:
    out = {}
    vio = []
    for layer in sorted(stats):
        load = stats[layer]["load"]
        mean = load.mean()
        if mean > 0:
            v = float((load.max() - mean) / mean)
            vio.append(v)
            out[f"moe/maxvio/layer_{layer}"] = v
        bias = stats[layer]["bias"]
        if bias is not None:
            if per_expert:
                for e, b in enumerate(bias):
                    out[f"moe/expert_bias/layer_{layer}/expert_{e}"] = float(b)
            out[f"moe/expert_bias/layer_{layer}/min"] = float(bias.min())
            out[f"moe/expert_bias/layer_{layer}/max"] = float(bias.max())
            out[f"moe/expert_bias/layer_{layer}/std"] = float(bias.std())
    spreads = [s["spread"] for s in stats.values() if s["bias"] is not None]
    if spreads:
        out["moe/bias_replica_spread"] = float(max(spreads))
    if vio:
        out["moe/maxvio_mean"] = float(np.mean(vio))
        out["moe/maxvio_max"] = float(np.max(vio))
    if with_cross and stats:
        cross = sum(s["cross"] for s in stats.values())
        if cross[2] > 0:
            assignments = sum(s["load"].sum() for s in stats.values())
            out["moe/cross_node_share"] = float(cross[0] / max(assignments, 1))
            out["moe/remote_nodes_per_token"] = float(cross[1] / cross[2])
            out["moe/remote_experts_per_token"] = float(cross[0] / cross[2])
    return out


# ----------------------------------------------------------------------------------------------
def _tell_once(key: str, message: str) -> None:
    from megatron.training import print_rank_last

    if key not in _S.told:
        _S.told.add(key)
        print_rank_last(f"[dsv3] {message}")


def _flops_per_iteration(args, config) -> float:
    from .flops import train_flops_per_iteration

    if _S.flops_per_iter is None:
        _S.flops_per_iter = train_flops_per_iteration(config, args.seq_length, args.global_batch_size,
                                                      causal=True)
    return _S.flops_per_iter


def _peak(args) -> Optional[float]:
    if _S.peak is not None:
        return _S.peak
    if not torch.cuda.is_available():
        _tell_once("peak", "MFU not logged: no GPU peak for this device (give --peak-tflops)")
        return None
    from .flops import peak_tflops

    name = torch.cuda.get_device_name()
    _S.peak = peak_tflops(name, "fp8" if args.fp8 else "bf16")
    if _S.peak is None:
        _tell_once("peak", f"MFU not logged: {name!r} is not in flops.PEAK_TFLOPS (give --peak-tflops)")
    return _S.peak


def _training_seconds() -> float:
    """Time Megatron's 'interval-time' timer has run (training steps only: it is stopped while
    checkpoints are saved and during evaluation). Reads the timer's running total, which Megatron
    never resets (``Timer._active_time``; checked by tests/test_patches.py)."""
    from megatron.training import get_timers

    timer = get_timers()("interval-time", log_level=0)
    running = time.time() - timer._start_time if timer._started else 0.0
    return timer._active_time + running


def _loss_scalars(loss_dict, config, logged: dict) -> dict:
    """The objective and its parts, on the last pipeline stage (where 'lm loss' exists)."""
    if "lm loss" not in loss_dict:
        return {}
    out = {"train/lm_loss": float(loss_dict["lm loss"])}
    total = out["train/lm_loss"]
    mtp = [float(logged[k]) for k in sorted(logged) if k.startswith("mtp_") and k.endswith(" loss")]
    if mtp:
        out["train/mtp_loss"] = config.mtp_loss_scaling_factor / len(mtp) * sum(mtp)
        total += out["train/mtp_loss"]
    if "seq_load_balancing_loss" in logged and config.num_moe_experts:
        # Megatron logs the balance loss averaged over MoE layers and without alpha.
        n_moe = len(config.moe_layer_numbers) + (config.mtp_num_layers or 0)
        out["train/seq_balance_loss"] = config.seq_aux_alpha * float(logged["seq_load_balancing_loss"]) * n_moe
        total += out["train/seq_balance_loss"]
    if len(out) > 1:
        out["train/loss"] = total
    return out


def _perf_scalars(args, config, seconds: Optional[float]) -> dict:
    if not seconds:
        return {}
    tflops = _flops_per_iteration(args, config) / seconds / args.world_size / 1e12
    out = {"perf/iteration_time_s": seconds,
           "perf/tokens_per_s": args.global_batch_size * args.seq_length / seconds,
           "perf/tflops_per_device": tflops}
    peak = _peak(args)
    if peak:
        out["perf/mfu"] = tflops / peak
    return out


def _expert_section(config) -> tuple[dict, dict, list[str]]:
    """(scalars, images, console parts) of the expert load since the last log. Collective."""
    from megatron.core import parallel_state

    stats = collect_expert_stats(
        config, parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True),
        parallel_state.get_pipeline_model_parallel_group())
    with_cross = config.ranks_per_node is not None
    if not with_cross:
        _tell_once("rpn", "cross-node routing metric off: ranks per node unknown (--ranks-per-node)")
    scalars = expert_scalars(stats, len(stats) * config.n_routed_experts <= _PER_EXPERT_LIMIT, with_cross)
    if config.token_dispatcher is not None:        # bytes a registered dispatcher says it sent
        sent = _S.dispatch_bytes.clone()
        torch.distributed.all_reduce(sent)
        per_iteration = sent / max(_S.iterations_since_log, 1)
        scalars["moe/dispatch_bytes_cross_node"] = float(per_iteration[0])
        scalars["moe/dispatch_bytes_intra_node"] = float(per_iteration[1])
        _S.dispatch_bytes.zero_()
    _S.iterations_since_log = 0
    images = {}
    from megatron.training import get_wandb_writer

    wanted = get_wandb_writer() is not None or _S.heatmap_dir      # built only when W&B or a PNG takes it
    if _is_last_rank() and stats and wanted:
        images["moe/load_heatmap"] = load_heatmap(stats, config.num_layers)
        bias = bias_heatmap(stats, config.num_layers)
        if bias is not None:
            images["moe/bias_heatmap"] = bias
        if _S.heatmap_dir:
            save_png(images["moe/load_heatmap"], os.path.join(_S.heatmap_dir, "load_latest.png"))
    console = []
    if "moe/maxvio_mean" in scalars:
        console.append(f"maxvio mean/max: {scalars['moe/maxvio_mean']:.3f}/{scalars['moe/maxvio_max']:.3f}")
    if "moe/cross_node_share" in scalars:
        console.append(f"cross-node share: {scalars['moe/cross_node_share']:.3f} "
                       f"({scalars['moe/remote_nodes_per_token']:.2f} other nodes/token)")
    return scalars, images, console


def _is_last_rank() -> bool:
    return torch.distributed.get_rank() == torch.distributed.get_world_size() - 1


def on_iteration(*, iteration, loss_dict, learning_rate, grad_norm, skipped_iter, wandb_logged=None):
    """The training_log hook: every rank, every iteration."""
    from megatron.training import get_args, get_wandb_writer, print_rank_last

    args = get_args()
    now = _training_seconds()
    seconds = None if _S.last_time is None else now - _S.last_time
    _S.last_time = now
    config = _S.config
    if config is None:
        return
    scalars = _loss_scalars(loss_dict, config, wandb_logged or {})
    if learning_rate is not None:
        scalars["train/lr"] = float(learning_rate)
    if grad_norm is not None:
        scalars["train/grad_norm"] = float(grad_norm)
    if config.num_moe_experts:
        scalars["train/gamma"] = float(config.moe_router_bias_update_rate)
    if config.mtp_num_layers:
        scalars["train/mtp_lambda"] = float(config.mtp_loss_scaling_factor)
    scalars.update(_perf_scalars(args, config, seconds))

    images, console = {}, []
    _S.iterations_since_log += 1
    if iteration % args.log_interval == 0:
        if config.num_moe_experts:
            expert_scalars_, images, console = _expert_section(config)
            scalars.update(expert_scalars_)
        if "perf/tokens_per_s" in scalars:
            console.insert(0, f"tokens/s: {scalars['perf/tokens_per_s']:.0f} | "
                              f"TFLOP/s/device: {scalars['perf/tflops_per_device']:.4g}"
                           + (f" | MFU: {100 * scalars['perf/mfu']:.1f}%" if "perf/mfu" in scalars else ""))
        console += [f"{name}: {scalars[key]:.3g}" for name, key in
                    (("gamma", "train/gamma"), ("lambda", "train/mtp_lambda")) if key in scalars]
        if console:
            print_rank_last(f" [dsv3] iteration {iteration:8d} | " + " | ".join(console))

    if _S.jsonl and _is_last_rank():
        with open(_S.jsonl, "a") as f:
            f.write(json.dumps({"iteration": iteration, **scalars}) + "\n")
    writer = get_wandb_writer()
    if writer is not None:
        payload = dict(scalars)
        for key, rgb in images.items():
            payload[key] = writer.Image(rgb, caption=f"iteration {iteration}")
        writer.log(payload, step=iteration)
