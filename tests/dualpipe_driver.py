"""The launcher with a dump after every training forward-backward, for tests/test_dualpipe.py:

    torchrun tests/dualpipe_driver.py OUT_DIR <launcher args> --pipeline-schedule dualpipe-dump

Registers ``dualpipe-dump`` / ``dualpipev-dump`` (our schedules) and ``nopipe-dump`` (Megatron-Core's own
get_forward_backward_func: no pipelining at PP 1) which, after the step's gradients are final (mirrored
copies summed, data-parallel reduced; before the optimizer step), write per rank:

    OUT/grads_r{rank}_s{step}.pt   {"orig": {key: grad}, "copy": {key: grad}, "bias": {key: expert bias},
                                    "copy_bias": {...}}   key = global parameter name | tp rank
    OUT/trace_r{rank}.jsonl        the schedule's record of each call (executed operations, timeline)

Keys use the model's global layer numbers and global expert indices, so any layout compares with any
other of the same tensor-parallel size. "copy" holds DualPipe's mirrored copies and MTP embedding
copies (parameters Megatron marks ``shared``), which must equal their originals.
"""
import json
import os
import re
import sys

import torch

OUT = sys.argv[1]
sys.argv = [sys.argv[0], *sys.argv[2:]]

from megatron_dsv3 import registry  # noqa: E402
from megatron_dsv3.compat.patches import apply, typing_override  # noqa: E402
from megatron_dsv3.training import launcher  # noqa: E402

apply([typing_override.PATCH])
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402

from megatron_dsv3.parallel.schedules import trace  # noqa: E402
from megatron_dsv3.parallel.schedules.dualpipe import Schedule  # noqa: E402

STEP = [0]


def _rank() -> int:
    return torch.distributed.get_rank()


def _unwrap(m):
    while hasattr(m, "module"):
        m = m.module
    return m


def grad_table(chunks) -> dict:
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_rank()
    ep, ep_size = ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size()
    out = {"orig": {}, "copy": {}, "bias": {}, "copy_bias": {}}
    for chunk in map(_unwrap, chunks):
        place = getattr(chunk, "dsv3_place", None)
        is_copy = place is not None and place.is_copy
        layers = {f"decoder.layers.{i}.": f"decoder.layers.{layer.layer_number - 1}."
                  for i, layer in enumerate(chunk.decoder.layers)} if hasattr(chunk, "decoder") else {}
        n_experts = chunk.config.num_moe_experts or 0

        def key(name):
            for local, glob in layers.items():
                if name.startswith(local):
                    name = glob + name[len(local):]
                    break
            m = re.search(r"local_experts\.(\d+)\.", name)
            if m:
                g = ep * (n_experts // ep_size) + int(m.group(1))
                name = name[:m.start(1)] + str(g) + name[m.end(1):]
            return f"{name}|tp{tp}"

        for name, p in chunk.named_parameters():
            g = getattr(p, "main_grad", None)
            g = p.grad if g is None else g
            if g is None:
                continue
            role = "copy" if (is_copy or getattr(p, "shared", False)) else "orig"
            out[role][key(name)] = g.detach().clone().float()
        for name, b in chunk.named_buffers():
            if name.endswith("expert_bias"):
                out["copy_bias" if is_copy else "bias"][key(name)] = b.detach().clone()
    return out


def dump(model) -> None:
    STEP[0] += 1
    chunks = model if isinstance(model, (list, tuple)) else [model]
    torch.save(grad_table(chunks), os.path.join(OUT, f"grads_r{_rank()}_s{STEP[0]}.pt"))


class Dumping(Schedule):
    def forward_backward(self, **kw):
        losses = super().forward_backward(**kw)
        if not kw.get("forward_only"):
            dump(kw["model"])
        return losses


registry.register(registry.SCHEDULES, "dualpipe-dump")(Dumping("dualpipe"))
registry.register(registry.SCHEDULES, "dualpipev-dump")(Dumping("dualpipev"))


@registry.register(registry.SCHEDULES, "nopipe-dump")
def nopipe_dump(*args, **kwargs):
    inner = get_forward_backward_func(*args, **kwargs)

    def forward_backward(**kw):
        losses = inner(**kw)
        if not kw.get("forward_only"):
            dump(kw["model"])
        return losses

    return forward_backward


def _sink(record: dict) -> None:
    with open(os.path.join(OUT, f"trace_r{_rank()}.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


trace.SINKS.append(_sink)

if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    launcher.main(sys.argv[1:])
