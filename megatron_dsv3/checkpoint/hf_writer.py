"""Writing a megatron-dsv3 model as a HF DeepSeek-V3 checkpoint: the full HF-named tensors gathered
over TP / EP, then ``config.json`` + ``model.safetensors`` on rank 0."""
from __future__ import annotations

import json
import os
import re

import torch
import torch.distributed as dist

from .hf_keys import MTP_SHARED_COPIES, HFCheckpointError, Layout, local_entries, tensor_table, unshard


def to_hf_state_dict(model, grads: bool = False) -> dict[str, torch.Tensor]:
    """The full HF-named state dict (or gradients) on every rank; collective over TP and EP.

    Pipeline parallelism is not supported here yet (a clear error).
    """
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() > 1:
        raise NotImplementedError("hf.save / to_hf_state_dict with pipeline parallelism is not supported yet")
    cfg = model.config
    lay = Layout.of(model)
    table = tensor_table(model)
    tp_group = ps.get_tensor_model_parallel_group() if lay.tp > 1 else None
    etp_group = ps.get_expert_tensor_parallel_group() if lay.etp > 1 else None
    ep_group = ps.get_expert_model_parallel_group() if lay.ep > 1 else None
    e_local = cfg.n_routed_experts // lay.ep if cfg.n_routed_experts else 0
    out: dict[str, torch.Tensor] = {}
    # Entries come in the same order on every rank (EP ranks hold the same local expert slots), so
    # the collectives below line up.
    for key, hf_names, ours, e in local_entries(model, lay):
        t = table.get(ours)
        if t is None:
            raise HFCheckpointError(f"our model has no tensor {ours!r} (for HF {hf_names[0]!r}): its layout is "
                                    f"not in the HF key table (megatron_dsv3/checkpoint/hf_keys.py)")
        if grads:
            g = getattr(t, "main_grad", None)
            t = g if g is not None else t.grad
            if t is None:
                t = torch.zeros_like(table[ours])
        t = t.detach().float()
        full = unshard(key, t, etp_group if key.shard.startswith("expert") else tp_group)
        if e is None:
            out.update(zip(hf_names, full))
            continue
        for name, piece in zip(hf_names, full):
            parts = [piece]
            if ep_group is not None:
                parts = [torch.empty_like(piece) for _ in range(lay.ep)]
                dist.all_gather(parts, piece.contiguous(), group=ep_group)
            for r, p in enumerate(parts):
                out[name.replace(f".experts.{e}.", f".experts.{r * e_local + e % e_local}.")] = p
    if not grads:
        for d in range(cfg.mtp_num_layers or 0):
            prefix = f"model.layers.{cfg.num_layers + d}."
            for copy, main in MTP_SHARED_COPIES.items():
                out[copy.format(h=prefix)] = out[main].clone()
    return out


def save(model, out_dir: str, dtype=torch.bfloat16) -> None:
    """Write ``model`` as a HF DeepSeek-V3 checkpoint (config.json + model.safetensors)."""
    from safetensors.torch import save_file

    state = to_hf_state_dict(model)
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        cfg = model.config.hf_dict()
        cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
        json.dump(cfg, f, indent=2)
    keep_fp32 = re.compile(r".*e_score_correction_bias$")
    save_file({k: (v if keep_fp32.match(k) else v.to(dtype)).contiguous() for k, v in sorted(state.items())},
              os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
