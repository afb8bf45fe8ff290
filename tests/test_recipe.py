"""The deepseek-v3 preset pretrains as the report did (plain RoPE at 4K, the report's hyper-parameters
where Megatron has them, flags the user gives win), and a YaRN context-extension run starts from a
checkpoint trained with plain RoPE."""
from __future__ import annotations

import pytest
import torch

from launch import TINY, metrics, run_ok
from megatron_dsv3.config import RECIPES
from megatron_dsv3.training import launcher

V3 = ["--cpu", "--dsv3-preset", "deepseek-v3", "--mock-data", "--tokenizer-type", "NullTokenizer",
      "--vocab-size", "255", "--micro-batch-size", "1", "--eval-iters", "0", "--eval-interval", "1000"]


@pytest.fixture(autouse=True)
def _launch_checks_build_no_process_group(no_process_groups):
    """Every test here runs launch checks only (tests/conftest.py: no_process_groups)."""


def test_preset_is_plain_rope_at_4k_with_the_report_recipe(capsys):
    args = launcher.prepare(V3 + ["--train-samples", "1000000"])
    assert args.rope_type == "rope" and args.rotary_scaling_factor == 1.0 and args.seq_length == 4096
    assert args.max_position_embeddings == 4096 and args.dsv3_fields["rope_scaling"] is None
    expected = {dest: value for dest, value, _, _ in RECIPES["deepseek-v3"]}
    assert (args.lr, args.min_lr, args.adam_beta1, args.adam_beta2, args.weight_decay, args.clip_grad,
            args.init_method_std) == (2.2e-4, 2.2e-5, 0.9, 0.95, 0.1, 1.0, 0.006)
    assert (args.lr_decay_style, args.lr_wsd_decay_style) == ("WSD", "cosine")
    assert args.lr_decay_samples == round(14.3e12 / 4096) and args.lr_wsd_decay_samples == round(4.3e12 / 4096)
    assert args.rampup_batch_size == [3072, 768, round(469e9 / 4096)] and args.global_batch_size == 15360
    schedules = args.dsv3_schedules
    assert schedules["bias_update_rate"].at(int(14.3e12) - 1) == 0.001 and schedules["bias_update_rate"].at(int(14.3e12)) == 0
    assert schedules["mtp_lambda"].at(int(10e12) - 1) == 0.3 and schedules["mtp_lambda"].at(int(10e12)) == 0.1
    assert args.moe_aux_loss_coeff == 1e-4
    out = capsys.readouterr().out
    assert "deepseek-v3 preset's training recipe" in out
    assert all(f"--{d.replace('_', '-')}" in out for d in expected)


def test_flags_given_win_and_token_schedules_need_samples(capsys):
    args = launcher.prepare(V3 + ["--train-iters", "10", "--lr", "1e-3", "--global-batch-size", "8",
                                  "--mtp-loss-scaling-factor", "0.2"])
    assert args.lr == 1e-3 and args.global_batch_size == 8 and args.rampup_batch_size is None
    assert args.lr_decay_style != "WSD" and args.lr_warmup_samples == 0
    assert "mtp_lambda" not in args.dsv3_schedules and args.dsv3_fields["mtp_lambda"] == 0.2
    assert args.adam_beta2 == 0.95           # still the recipe's
    assert "not applied with --train-iters" in capsys.readouterr().out


def test_yarn_extension_flags_turn_yarn_on():
    yarn = ["--rope-type", "yarn", "--rotary-scaling-factor", "40", "--mscale", "1.0", "--mscale-all-dim", "1.0",
            "--yarn-original-max-position-embeddings", "4096", "--yarn-beta-fast", "32", "--yarn-beta-slow", "1",
            "--seq-length", "32768", "--max-position-embeddings", "32768"]
    args = launcher.prepare(V3 + ["--train-iters", "2"] + yarn)
    rope = args.dsv3_fields["rope_scaling"]
    assert rope == {"type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                    "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0}
    assert args.rope_type == "yarn" and args.rotary_scaling_factor == 40.0
    with pytest.raises(SystemExit, match="--yarn-beta-slow"):
        launcher.prepare(V3 + ["--train-iters", "2"] + yarn[:-6] + yarn[-4:])    # one YaRN value missing


def test_extension_run_from_a_plain_rope_checkpoint(tmp_path, monkeypatch):
    """Phase 1: tiny DSv3 with plain RoPE at seq 32, saved. Phase 2: --finetune from it with YaRN
    (factor 4) at seq 128: the checkpoint loads and the run trains."""
    monkeypatch.undo()          # this test launches real runs
    base = [a for a in TINY if a not in ("--seq-length", "32")]
    ckpt = tmp_path / "ckpt_plain"
    run_ok(1, base + ["--seq-length", "32", "--rope-type", "rope", "--train-iters", "3", "--save", str(ckpt),
                      "--save-interval", "3"])
    out = tmp_path / "ext.jsonl"
    log = run_ok(1, base + ["--seq-length", "128", "--max-position-embeddings", "128", "--rope-type", "yarn",
                            "--rotary-scaling-factor", "4", "--mscale", "1.0", "--mscale-all-dim", "1.0",
                            "--yarn-original-max-position-embeddings", "32", "--yarn-beta-fast", "32",
                            "--yarn-beta-slow", "1", "--train-iters", "3", "--finetune", "--load", str(ckpt),
                            "--metrics-jsonl", str(out)])
    assert "loading checkpoint" in log.lower() or "loaded checkpoint" in log.lower(), log[-3000:]
    m = metrics(str(out))
    assert sorted(m) == [1, 2, 3] and all(torch.isfinite(torch.tensor(v["train/lm_loss"])) for v in m.values())
