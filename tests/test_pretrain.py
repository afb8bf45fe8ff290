"""The launcher on Megatron's training loop: layout parity, exact resume, a save killed midway, and
every expert-bias replica staying identical.

One world-1 run (A) trains 6 steps and saves at step 3. From that checkpoint:
  B  world 1, resumed (model, Adam, lr schedule, RNG, data position) -> steps 4..6 equal A's exactly;
  the layouts load only its weights (Megatron's non-distributed optimizer state does not reshard)
  and train steps 4..6 from a fresh optimizer:
  world 1; TP2 x EP2 (SP) on 4 ranks; PP2 interleaved (2 virtual stages of 1 layer) on 2 ranks ->
  each within 1e-5 relative of world 1. (PP2 x EP2 loads and trains from one checkpoint in
  tests/test_dualpipe.py and tests/test_convert.py.)
Starting all layouts from one checkpoint gives them identical weights (Megatron initialises each
layout's shards from different RNG streams); resharding the checkpoint is part of what is tested.
"""
from __future__ import annotations

import os
import shutil
import signal
import time

import pytest

from launch import LAYOUTS, TINY, launch, metrics, run_ok

STEPS = ["--train-iters", "6"]
#: world 1 (the reference) first
PARITY_LAYOUTS = ("world1", "tp2ep2", "pp2vpp2")


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    ckpt = root / "ckpt_a"
    log = run_ok(1, TINY + STEPS + ["--save", str(ckpt), "--save-interval", "3", "--moe-per-layer-logging",
                                    "--metrics-jsonl", str(root / "a.jsonl"),
                                    "--wandb-project", "dsv3-test", "--wandb-save-dir", str(root / "wandb")])
    assert (ckpt / "iter_0000003").is_dir() and (ckpt / "iter_0000006").is_dir(), log[-3000:]
    return root, metrics(str(root / "a.jsonl"))


def _resume_from_3(root, name):
    """A checkpoint dir holding only A's step-3 checkpoint."""
    src, dst = root / "ckpt_a", root / f"ckpt_{name}"
    shutil.copytree(src / "iter_0000003", dst / "iter_0000003")
    (dst / "latest_checkpointed_iteration.txt").write_text("3")
    return dst


def test_loss_falls_and_metrics_are_logged(run_a):
    """The W&B offline run holds the README's metrics; train/loss is the DSv3 objective."""
    from megatron_dsv3.training.metrics import METRICS
    from megatron_dsv3.training.wandb_offline import read_history

    root, a = run_a
    assert sorted(a) == [1, 2, 3, 4, 5, 6]
    assert a[6]["train/lm_loss"] < a[1]["train/lm_loss"]
    history = read_history(str(root / "wandb"))
    expected = [k for k in METRICS if "{" not in k and k not in ("perf/mfu",)
                and not k.startswith("moe/dispatch_bytes")]        # (only with a registered dispatcher)
    missing = [k for k in expected if k not in history and not any(h.startswith(k + "/") for h in history)]
    assert not missing, f"not in the W&B run: {missing}"
    for key in ("moe/maxvio/layer_2", "moe/expert_bias/layer_5/expert_7", "mtp_1 loss", "seq_load_balancing_loss"):
        assert key in history, key
    step6 = {k: dict(v)[6] for k, v in history.items() if 6 in dict(v)}
    # The objective from the parts Megatron itself logged: lambda and alpha as the preset defines them,
    # the balance loss as the sum of Megatron's per-layer values (--moe-per-layer-logging; dense layers
    # log 0), so no layer count is assumed here.
    from megatron_dsv3.config import PRESETS

    lam, alpha = PRESETS["tiny"]["mtp_lambda"], PRESETS["tiny"]["seq_aux_alpha"]
    per_layer = [v for k, v in step6.items() if k.startswith("moe/seq_load_balancing_loss_layer_")]
    assert len(per_layer) == 5 and sum(v > 0 for v in per_layer) == 4     # 4 decoder + 1 MTP; 1 dense
    objective = step6["train/lm_loss"] + lam * step6["mtp_1 loss"] + alpha * sum(per_layer)
    assert abs(step6["train/loss"] - objective) < 1e-5 * objective
    assert step6["train/lm_loss"] == a[6]["train/lm_loss"]
    assert a[6]["perf/tflops_per_device"] > 0 and a[6]["perf/tokens_per_s"] > 0


def test_resume_matches_uninterrupted_run(run_a):
    """Stop at step 3, resume from the checkpoint (model, Adam state, lr schedule, RNG, data position):
    steps 4..6 are the very same floats as the uninterrupted run."""
    root, a = run_a
    ckpt = _resume_from_3(root, "resume")
    out = root / "resume.jsonl"
    log = run_ok(1, TINY + STEPS + ["--load", str(ckpt), "--metrics-jsonl", str(out)])
    assert "loaded checkpoint" in log.lower() or "loading checkpoint" in log.lower(), log[-3000:]
    b = metrics(str(out))
    assert sorted(b) == [4, 5, 6], f"resumed run logged iterations {sorted(b)}"
    for it in (4, 5, 6):
        assert b[it]["train/lm_loss"] == a[it]["train/lm_loss"], (it, b[it], a[it])
        assert b[it]["train/grad_norm"] == a[it]["train/grad_norm"]


@pytest.fixture(scope="module")
def layout_runs(run_a):
    """Each layout loads A's step-3 weights (no optimizer state: Megatron's non-distributed
    optimizer checkpoint does not reshard across layouts) and trains steps 4..6."""
    from megatron_dsv3.checkpoint.convert import mcore_to_hf

    root, _ = run_a
    ckpt = _resume_from_3(root, "layouts")
    results = {"start": str(root / "hf_start")}
    # the weights as HF tensors: dsv3-convert in this process (any layout, no process group); the
    # launcher's own --export-hf is tested in test_export_hf_of_trained_checkpoint
    mcore_to_hf(str(ckpt), results["start"], dtype="fp32", progress=False)
    for layout in PARITY_LAYOUTS:
        nproc, extra = LAYOUTS[layout]
        out = root / f"{layout}.jsonl"
        saved = root / f"ckpt_after_{layout}"
        run_ok(nproc, TINY + STEPS + extra + ["--load", str(ckpt), "--no-load-optim", "--no-load-rng",
                                              "--metrics-jsonl", str(out), "--save", str(saved),
                                              "--save-interval", "6"])
        results[layout] = metrics(str(out))
        mcore_to_hf(str(saved), str(root / f"hf_after_{layout}"), dtype="fp32", progress=False)
        results[layout]["hf"] = str(root / f"hf_after_{layout}")
    return results


def _hf_tensors(hf_dir) -> dict:
    from safetensors.torch import load_file

    out = {}
    for name in sorted(os.listdir(hf_dir)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(hf_dir, name)))
    return out


@pytest.mark.parametrize("layout", PARITY_LAYOUTS[1:])
def test_layouts_match_world_size_1(layout_runs, layout):
    """Per step: LM loss and global gradient norm (<= 1e-5 relative); after the steps, every weight: its
    difference from world 1 is <= 1e-3 of how far the three Adam steps moved it (Adam divides by the
    gradient's running RMS, so an entry with a near-zero gradient turns a 1e-6 relative gradient
    difference into a larger relative update difference; measured <= 2e-5 of the weight)."""
    ref, got = layout_runs["world1"], layout_runs[layout]
    assert sorted(k for k in got if k != "hf") == sorted(k for k in ref if k != "hf") == [4, 5, 6]
    for it in (4, 5, 6):
        for key in ("train/lm_loss", "train/grad_norm"):
            r, g = ref[it][key], got[it][key]
            assert abs(g - r) <= 1e-5 * abs(r), f"{layout} iteration {it} {key}: {g!r} vs world 1 {r!r}"
    assert ref[6]["train/lm_loss"] < ref[4]["train/lm_loss"] + 0.5  # it trained, not diverged
    a, b, start = (_hf_tensors(d) for d in (ref["hf"], got["hf"], layout_runs["start"]))
    assert set(a) == set(b) == set(start)
    moved_any = False
    for name, t in a.items():
        moved = (t - start[name]).abs().max().item()
        moved_any |= moved > 0
        assert (b[name] - t).abs().max().item() <= 1e-3 * moved, (layout, name, moved)
    assert moved_any


def test_killed_save_leaves_previous_checkpoint_loadable(run_a, tmp_path):
    """Kill the run while its step-4 checkpoint is being written (the shard files are on disk but the
    save has not finished); the step-2 checkpoint must still load and continue exactly like run A."""
    root, a = run_a
    ckpt = tmp_path / "ckpt"
    proc = launch(1, TINY + STEPS + ["--save", str(ckpt), "--save-interval", "2"], popen=True,
                  entry=[os.path.join(os.path.dirname(__file__), "stall_save.py"), "4"])
    deadline, seen = time.time() + 300, ""
    try:
        for line in proc.stdout:
            seen += line
            if "DSV3_TEST: save stalled" in line:
                break
            assert time.time() < deadline, seen[-3000:]
        else:
            pytest.fail("the run ended without reaching the stalled save:\n" + seen[-3000:])
        assert (ckpt / "iter_0000004").exists(), "the killed save should have left a partial directory"
    finally:
        _kill_tree(proc.pid)
        proc.wait()
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    out = tmp_path / "resumed.jsonl"
    run_ok(1, TINY + STEPS + ["--load", str(ckpt), "--metrics-jsonl", str(out)])
    resumed = metrics(str(out))
    assert sorted(resumed) == [3, 4, 5, 6]
    assert all(resumed[i]["train/lm_loss"] == a[i]["train/lm_loss"] for i in (3, 4, 5, 6))


def _kill_tree(pid: int) -> None:
    """SIGKILL torchrun and every process under it (its ranks run in their own process groups)."""
    import psutil

    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    family = parent.children(recursive=True) + [parent]
    for p in family:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)


def test_expert_bias_moves_by_gamma_and_replicas_stay_identical(run_a, layout_runs):
    """The sign rule: after n steps every bias is a multiple of gamma with |b| <= n * gamma, and
    some moved. Under TP2 x EP2 every rank that routes for a layer holds the same bias (the launcher
    measures the spread over replicas with a MAX/MIN all-reduce each log step)."""
    _, a = run_a
    gamma = a[6]["train/gamma"]
    biases = [v for k, v in a[6].items() if _per_expert_bias(k)]
    assert len(biases) == 4 * 8  # 3 MoE layers + 1 MTP layer, 8 experts
    steps = [b / gamma for b in biases]
    assert all(abs(x - round(x)) < 1e-3 and abs(x) <= 6 + 1e-3 for x in steps), steps
    assert any(round(x) != 0 for x in steps)
    assert a[6]["moe/bias_replica_spread"] == 0.0
    c = layout_runs["tp2ep2"]
    assert all(c[i]["moe/bias_replica_spread"] == 0.0 for i in (4, 5, 6))
    assert any(abs(v) > 0 for k, v in c[6].items() if _per_expert_bias(k))


def _per_expert_bias(key: str) -> bool:
    return key.startswith("moe/expert_bias/") and key.rsplit("/", 1)[1].startswith("expert_")


def test_export_hf_of_trained_checkpoint(run_a, tmp_path):
    """--export-hf writes the trained checkpoint as HF DeepSeek-V3: every expected key, and the
    expert biases are exactly the ones the run logged at its last step."""
    from safetensors.torch import load_file

    from megatron_dsv3 import hf
    from megatron_dsv3.config import DSv3Config

    root, a = run_a
    out = tmp_path / "hf"
    run_ok(1, TINY + STEPS + ["--load", str(root / "ckpt_a"), "--export-hf", str(out),
                              "--export-hf-dtype", "float32"])
    cfg = DSv3Config.from_hf_config(str(out), seq_aux_alpha=1e-4, bias_update_rate=1e-3, mtp_lambda=0.3)
    state = load_file(str(out / "model.safetensors"))
    assert set(state) == hf.expected_hf_keys(cfg)
    assert cfg.num_layers == 4 and cfg.mtp_num_layers == 1
    for layer in range(2, 6):   # MoE decoder layers 2..4 and the MTP layer (HF index 4)
        bias = state[f"model.layers.{layer - 1}.mlp.gate.e_score_correction_bias"]
        logged = [a[6][f"moe/expert_bias/layer_{layer}/expert_{e}"] for e in range(8)]
        assert bias.tolist() == logged, layer


def test_registered_schedule_and_dispatcher_are_used(run_a, tmp_path):
    """A schedule and a dispatcher registered from outside (wrapping Megatron's) are picked up by
    --pipeline-schedule / --moe-token-dispatcher-type, and the losses are A's to the last bit."""
    _, a = run_a
    out = tmp_path / "reg.jsonl"
    args = [x if x != "alltoall" else "counting-alltoall" for x in TINY]
    log = run_ok(1, args + STEPS[:1] + ["2", "--pipeline-schedule", "counting-1f1b",
                                        "--metrics-jsonl", str(out)],
                 entry=[os.path.join(os.path.dirname(__file__), "registry_driver.py")])
    calls = [line for line in log.splitlines() if line.startswith("DSV3_TEST_CALLS")]
    assert calls, log[-3000:]
    schedule, dispatch = (int(x.split("=")[1]) for x in calls[-1].split()[1:])
    assert schedule == 2 and dispatch == 2 * 2 * 4   # 2 steps x 2 micro-batches x 4 MoE layers
    reg = metrics(str(out))
    # the lr schedule of a 2-step run differs from A's 6 steps after step 1
    assert reg[1]["train/lm_loss"] == a[1]["train/lm_loss"]
