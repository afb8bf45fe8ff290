"""The same HF checkpoint under TP2, EP2 and TP2 x EP2 (sequence parallel with TP) on 4 gloo ranks
gives the world-size-1 logits, MTP logits, loss and gradients. One spawned world runs all layouts."""
from __future__ import annotations

import json

import pytest
import torch

from distributed import run_world
from hf_reference import make_checkpoint
from parallel_checks import LAYOUTS, loss_and_grads, parity


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cpu_world):
    from megatron_dsv3 import hf

    d = tmp_path_factory.mktemp("par")
    ckpt = str(d / "ckpt")
    make_checkpoint(ckpt, "base", seed=3)
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 128, (4, 16), generator=gen)
    labels = torch.randint(0, 128, (4, 16), generator=gen)
    model = hf.load(ckpt)
    ref = {"ids": ids, "labels": labels, "logits": hf.logits(model, ids),
           "mtp": hf.mtp_logits(model, ids)[0]}
    ref["loss"] = loss_and_grads(model, ids, labels).item()
    ref["grads"] = hf.to_hf_state_dict(model, grads=True)
    assert all(g.abs().sum() > 0 for k, g in ref["grads"].items() if "e_score_correction_bias" not in k
               and ".experts." not in k), "every non-expert tensor must get a gradient"
    torch.save(ref, d / "ref.pt")
    return ckpt, str(d / "ref.pt"), str(d / "report.json")


def test_tp_ep_layouts_match_world_size_1(reference):
    ckpt, ref_path, out_path = reference
    run_world(4, parity, ckpt, ref_path, out_path)
    with open(out_path) as f:
        report = json.load(f)
    print(json.dumps(report, indent=1))
    sp = report.pop("balance_loss_sp")
    assert sp["loss_rel"] <= 1e-12 and sp["grad_abs"] <= 1e-15, sp
    assert set(report) == set(LAYOUTS)
    for name, err in report.items():
        assert err["sequence_parallel"] == (LAYOUTS[name]["tp"] > 1)
        assert err["logits"] <= 1e-5, (name, err)
        assert err["mtp"] <= 1e-5, (name, err)
        assert err["loss_rel"] <= 1e-5, (name, err)
        assert err["grad_rel"] <= 1e-5, (name, err)
