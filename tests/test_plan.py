"""The planner (megatron_dsv3/training/plan.py, tools/plan.py = dsv3-plan) and the H800 recipes.

- parameter counts equal the model built on the meta device (every parameter and expert-bias buffer;
  MTP apart, without a second embedding / head) for the deepseek-v3 preset, the published V2-Lite and V3
  configs and the tiny preset; the published totals of V3 / V2 / V2-Lite / Kimi-K2 (tests/data/hf_configs);
- FLOPs per token are flops.py's count (3 x forward per token);
- the bubble fraction is 1F1B's closed form (p-1)/(m+p-1); the byte-weighted activation peak agrees
  with the simulator's count; memory per rank adds up (parameters over pipeline ranks, experts over EP)
  and moves the right way with recomputation, FP8, micro-batch size and DualPipe's copies;
- all-to-all: the node limit caps the nodes a token reaches and cuts IB copies;
- layouts that cannot run are reported with the flag to change; --json carries the keys;
- every examples/h800_*.sh: its exact flags (printed by the script itself) fit an 80 GB H800 and pass
  the launch checks.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

from launch import ROOT
from megatron_dsv3.training import plan as planner

DATA = os.path.join(ROOT, "tests", "data", "hf_configs")
warnings.filterwarnings("ignore")


def _plan(*argv, **kw):
    return planner.plan(list(argv), **kw)


# ----------------------------------------------------------------------------------------------
# Parameters: against the model on the meta device
# ----------------------------------------------------------------------------------------------
def _meta_counts(cfg) -> dict:
    """Counted from a built model: every parameter and expert-bias buffer, main model and MTP apart."""
    from megatron_dsv3.spec import build_model

    with torch.device("meta"):
        model = build_model(cfg)
    main = mtp = emb = unused = mtp_unused = 0
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    tensors = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if n.endswith("expert_bias")]
    for name, t in tensors:
        if name.startswith("mtp."):
            mtp += t.numel()
            if ".mlp.experts." in name:
                mtp_unused += t.numel() * (E - K) // E
            continue
        main += t.numel()
        if name == "embedding.word_embeddings.weight":
            emb = t.numel()
        if ".mlp.experts." in name:
            unused += t.numel() * (E - K) // E
    return {"total_params": main, "mtp_params": mtp, "activated_params": main - emb - unused,
            "mtp_activated_params": mtp - mtp_unused}


@pytest.mark.parametrize("argv", [["--preset", "deepseek-v3"], ["--preset", "tiny", "--seq-length", "64"],
                                  ["--hf-config", os.path.join(DATA, "deepseek-v2-lite.json")],
                                  ["--hf-config", os.path.join(DATA, "deepseek-v3.json")]],
                         ids=["preset-v3", "preset-tiny", "hf-v2-lite", "hf-v3"])
def test_parameter_counts_equal_the_meta_model(argv, cpu_world):
    p = _plan(*argv)
    launcher_argv = ["--dsv3-preset" if argv[0] == "--preset" else "--dsv3-hf-config", *argv[1:]]
    fields, _ = planner._fields(*planner._parse(launcher_argv, 1))
    cfg = planner.model_config(fields)
    want = _meta_counts(cfg)
    for key, value in want.items():
        assert p[key] == value, (key, p[key], value)


@pytest.mark.parametrize("config, total, activated_b", [
    ("deepseek-v3.json", 671_026_419_200, 37), ("deepseek-v2.json", 235_741_434_880, 21),
    ("deepseek-v2-lite.json", 15_706_484_224, 2.4), ("kimi-k2-instruct.json", 1_026_408_232_448, 32)])
def test_published_totals_and_activated(config, total, activated_b):
    """Totals: the checkpoints' element counts less what they store beyond the model (MTP copies of
    embedding / head, FP8 scales; tests/test_hf_configs.py). Activated: the model cards' rounded figure."""
    p = _plan("--hf-config", os.path.join(DATA, config))
    assert p["total_params"] == total
    assert abs(p["activated_params"] / 1e9 - activated_b) / activated_b < 0.03, p["activated_params"]


def test_deepseek_v3_preset_mtp_and_json_keys():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "plan.py"), "--preset", "deepseek-v3", "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    p = json.loads(out.stdout)
    for key in ("total_params", "activated_params", "mtp_params", "flops_per_token", "memory_per_gpu_bytes",
                "bubble_fraction"):
        assert key in p, key
    assert p["total_params"] == 671_026_419_200 and p["bubble_fraction"] == 0.0      # one GPU, no pipeline


# ----------------------------------------------------------------------------------------------
# FLOPs, bubble, activations, memory
# ----------------------------------------------------------------------------------------------
def test_flops_per_token_is_flops_py_count():
    from megatron_dsv3.training import flops

    from megatron_dsv3.config import PRESETS

    p = _plan("--preset", "deepseek-v3", "--seq-length", "4096")
    cfg = planner.model_config(dict(PRESETS["deepseek-v3"]))
    assert p["flops_per_token"] == flops.train_flops_per_iteration(cfg, 4096, 1) / 4096
    assert abs(p["flops_per_token"] / 1e12 - 0.2606) < 5e-4            # README's 0.2606 TFLOP per token


@pytest.mark.parametrize("pp, m", [(2, 4), (4, 8), (4, 16), (8, 24)])
def test_bubble_fraction_of_1f1b_is_the_closed_form(pp, m):
    p = _plan("--preset", "tiny", "--num-layers", str(pp), "--seq-length", "64", "--pipeline-model-parallel-size",
              str(pp), "--micro-batch-size", "1", "--global-batch-size", str(m), "--world-size", str(pp))
    assert p["layout"]["micro_batches"] == m
    assert math.isclose(p["bubble_fraction"], (pp - 1) / (m + pp - 1))


@pytest.mark.parametrize("schedule, n, m", [("1f1b", 4, 12), ("dualpipe", 4, 12), ("dualpipev", 4, 12),
                                            ("dualpipe", 16, 120)])
def test_weighted_peak_with_unit_weights_is_the_simulator_count(schedule, n, m):
    from megatron_dsv3.parallel.schedules import order, simulate

    sim = simulate.simulate(schedule, n, m)
    peaks = [planner._weighted_peak(ops, {0: 1, 1: 1}) for ops in order.ops(schedule, n, m)]
    assert max(peaks) == sim["peak_activations"] and peaks == sim["activations"]


BASE = ["--preset", "deepseek-v3", "--num-layers", "16", "--first-k-dense-replace", "1", "--seq-length", "4096",
        "--micro-batch-size", "1", "--bf16", "--expert-model-parallel-size", "8", "--pipeline-model-parallel-size", "4",
        "--global-batch-size", "256", "--use-distributed-optimizer", "--world-size", "64", "--ranks-per-node", "8"]


def _acts(p) -> float:
    return max(r["bytes"]["activations"] for r in p["memory_per_rank"])


def test_memory_adds_up_over_ranks():
    p = _plan(*BASE)
    c = p["params_breakdown"]
    # every stage's parameters held once over the 4 pipeline ranks; the routed experts split 8 ways; the
    # MTP stage (the last) also builds its own copy of the shared embedding
    V, h = 129280, 7168
    held = sum(r["params"] for r in p["memory_per_rank"])
    assert held == p["total_params"] + p["mtp_params"] + V * h - (c["routed_experts"] + _mtp_experts(p)) * 7 // 8
    # weights in bf16 except the fp32 router / bias; gradients fp32; Adam states sharded over DP 16
    r0 = p["memory_per_rank"][0]
    assert r0["bytes"]["gradients"] == 4 * r0["params"]
    assert 2 * r0["params"] <= r0["bytes"]["weights"] < 2.01 * r0["params"]


def _mtp_experts(p) -> int:
    return 256 * 3 * 7168 * 2048


def test_memory_moves_with_the_settings():
    base = _plan(*BASE)
    assert _acts(_plan(*BASE, "--recompute-granularity", "selective", "--recompute-modules", "mla_up_proj",
                       "layernorm")) < _acts(base)
    full = _plan(*BASE, "--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1")
    first = lambda p: p["memory_per_rank"][0]["bytes"]["activations"]      # noqa: E731  (no head / MTP there)
    assert first(full) < first(base) / 10 and full["memory_breakdown_bytes"]["recompute_buffer"] > 0
    assert _acts(_plan(*BASE, "--fp8-format", "e4m3", "--fp8-recipe", "blockwise")) < _acts(base)
    two = _plan(*BASE, "--micro-batch-size", "2")
    assert math.isclose(_acts(two), 2 * _acts(base), rel_tol=0.01)
    no_zero = _plan(*[a for a in BASE if a != "--use-distributed-optimizer"])
    # ZeRO-1 shards Adam over DP 16 (dense) and expert-DP 2 (experts): at least 2x less
    assert no_zero["memory_breakdown_bytes"]["optimizer_states"] > 2 * base["memory_breakdown_bytes"]["optimizer_states"]
    dual = _plan(*BASE, "--pipeline-schedule", "dualpipe")
    assert dual["schedule"]["param_copies"] == 2
    assert min(r["params"] for r in dual["memory_per_rank"]) > 1.5 * min(r["params"] for r in base["memory_per_rank"])
    assert dual["schedule"]["peak_activations_micro_batch_stages"] == 4 + 1          # PP + 1 (report Table 2)


def test_all_to_all_node_limit():
    p = _plan(*BASE[:-4], "--expert-model-parallel-size", "32", "--world-size", "128", "--ranks-per-node", "8",
              "--moe-router-num-groups", "4", "--moe-router-group-topk", "2",
              "--moe-token-dispatcher-type", "node_limited")
    a = p["all_to_all"]
    assert (a["ep_nodes"], a["ep_ranks_per_node"]) == (4, 8)
    limited, free = a["node_limited_routing"], a["unlimited_routing"]
    assert limited["max_nodes_per_token"] <= 2 < free["max_nodes_per_token"]
    assert limited["node_limited"]["ib_copies_per_token"] <= 2          # at most M = 2 other nodes
    assert limited["node_limited"]["ib_bytes_per_step"] < free["node_limited"]["ib_bytes_per_step"]
    assert limited["node_limited"]["ib_bytes_per_step"] < limited["flat"]["ib_bytes_per_step"] / 2
    assert p["runnable"], p["launch_problems"]


# ----------------------------------------------------------------------------------------------
# Layouts that cannot run
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, flag", [
    (["--expert-model-parallel-size", "3", "--world-size", "12"], "--expert-model-parallel-size 3"),
    (["--pipeline-model-parallel-size", "3", "--pipeline-schedule", "dualpipe", "--world-size", "3"],
     "--pipeline-model-parallel-size 3"),
    (["--pipeline-model-parallel-size", "4", "--world-size", "6"], "--pipeline-model-parallel-size 4"),
    (["--expert-model-parallel-size", "16", "--world-size", "16", "--moe-token-dispatcher-type", "node_limited",
      "--ranks-per-node", "8"], "--moe-router-num-groups"),
    (["--pipeline-model-parallel-size", "16", "--pipeline-schedule", "dualpipe", "--num-layers", "16",
      "--world-size", "2048", "--global-batch-size", "15360", "--rampup-batch-size", "3072", "768", "1000"],
     "--rampup-batch-size 3072 768"),
    (["--fp8-recipe", "blockwise"], "--fp8-recipe blockwise acts only with --fp8-format"),
])
def test_layouts_that_cannot_run_name_the_flag(extra, flag):
    p = _plan("--preset", "deepseek-v3", "--seq-length", "4096", "--micro-batch-size", "1", *extra)
    assert not p["runnable"]
    assert any(flag in m for m in p["launch_problems"]), p["launch_problems"]


def test_cli_check_exit_code_and_table():
    cmd = [sys.executable, os.path.join(ROOT, "tools", "plan.py"), "--preset", "deepseek-v3", "--check"]
    out = subprocess.run(cmd + ["--expert-model-parallel-size", "3", "--world-size", "3"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "CANNOT LAUNCH" in out.stdout and "--expert-model-parallel-size 3" in out.stdout
    out = subprocess.run(cmd + ["--tensor-model-parallel-size", "nine"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2 and "--tensor-model-parallel-size" in out.stderr


# ----------------------------------------------------------------------------------------------
# The H800 recipes, from their exact flags
# ----------------------------------------------------------------------------------------------
RECIPES = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "examples")) if f.startswith("h800_") and f.endswith(".sh"))


def _recipe(name) -> tuple[list[str], int]:
    env = {"PATH": os.environ["PATH"], "DSV3_PRINT_ARGS": "1"}
    script = os.path.join(ROOT, "examples", name + ".sh")
    args = subprocess.run(["bash", script], env=env, capture_output=True, text=True, check=True).stdout.splitlines()
    env = {"PATH": os.environ["PATH"], "DSV3_PRINT_NODES": "1"}
    nodes = int(subprocess.run(["bash", script], env=env, capture_output=True, text=True, check=True).stdout)
    return args, nodes


def test_there_are_the_three_recipes_each_with_slurm():
    assert RECIPES == ["h800_dsv2_lite_1node", "h800_dsv3_671b", "h800_dsv3_mid_8nodes"]
    for name in RECIPES:
        sbatch = open(os.path.join(ROOT, "examples", name + ".sbatch")).read()
        assert f"DSV3_PRINT_ARGS=1 bash examples/{name}.sh" in sbatch and "#SBATCH --nodes=" in sbatch


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_fits_an_80gb_h800(name):
    args, nodes = _recipe(name)
    p = _plan(*args, "--nodes", str(nodes))
    assert p["layout"]["world"] == nodes * 8 and p["layout"]["ranks_per_node"] == 8
    assert p["gpu_memory_bytes"] == 81559 * 2 ** 20
    assert p["fits"], (name, p["memory_per_gpu_bytes"] / 1e9, p["memory_breakdown_bytes"])


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_passes_the_launch_checks(name):
    args, nodes = _recipe(name)
    p = _plan(*args, "--nodes", str(nodes))
    assert p["runnable"], p["launch_problems"]


def test_671b_recipe_is_the_reports_layout():
    args, nodes = _recipe("h800_dsv3_671b")
    p = _plan(*args, "--nodes", str(nodes))
    L = p["layout"]
    assert nodes * 8 == 2048 and (L["pp"], L["ep"], L["tp"], L["dp"]) == (16, 64, 1, 128)
    assert L["distributed_optimizer"] and L["schedule"] == "dualpipe" and L["dispatcher"] == "node_limited"
    assert (L["fp8"], L["fp8_recipe"]) == ("e4m3", "blockwise")
    a = p["all_to_all"]
    assert (a["ep_nodes"], a["node_limited_routing"]["node_limit"]) == (8, 4)
    assert p["runnable"] and not p["launch_problems"], p["launch_problems"]
