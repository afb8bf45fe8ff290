"""Bad launches fail before any process group exists, with a message naming the flag to change;
good flags resolve to the DSv3 model and are written back into Megatron's args."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from launch import ROOT, TINY
from megatron_dsv3.training import launcher as pretrain
from megatron_dsv3.training.arguments import LaunchError


@pytest.fixture(autouse=True)
def no_process_groups(monkeypatch):
    """Building any process group during a launch check is a test failure."""
    from megatron.core import parallel_state

    def refuse(*args, **kwargs):
        raise AssertionError("a process group was built during the launch checks")

    monkeypatch.setattr(torch.distributed, "init_process_group", refuse)
    monkeypatch.setattr(torch.distributed, "new_group", refuse)
    monkeypatch.setattr(parallel_state, "initialize_model_parallel", refuse)


def _prepare(*extra, base=TINY):
    return pretrain.prepare(list(base) + ["--train-iters", "2", *extra])


def _fails(*extra, base=TINY) -> str:
    with pytest.raises(LaunchError) as info:
        _prepare(*extra, base=base)
    return str(info.value.code)


@pytest.mark.parametrize("extra, flag", [
    (["--dsv3-preset", "deepseek-v4"], "--dsv3-preset"),
    (["--expert-model-parallel-size", "3"], "--expert-model-parallel-size"),
    (["--num-experts", "6", "--expert-model-parallel-size", "4"], "--num-experts 6"),
    (["--tensor-model-parallel-size", "3"], "--tensor-model-parallel-size"),
    (["--tensor-model-parallel-size", "2"], "--sequence-parallel"),
    (["--normalization", "LayerNorm"], "--normalization"),
    (["--moe-router-load-balancing-type", "aux_loss"], "--moe-router-load-balancing-type"),
    (["--moe-aux-loss-coeff", "0.01", "0.02"], "--moe-aux-loss-coeff"),
    (["--fp8-format", "hybrid"], "--fp8-format"),
    (["--moe-router-bias-update-schedule", "10:0.001"], "--moe-router-bias-update-schedule"),
    (["--mtp-loss-scaling-schedule", "0:0.3,5T:-1"], "--mtp-loss-scaling-schedule"),
    (["--pipeline-schedule", "dualpipe-not-yet"], "--pipeline-schedule"),
    (["--moe-layer-freq", "([1]*4)", "--first-k-dense-replace", "1"], "--moe-layer-freq"),
    (["--spec", "megatron_dsv3.spec", "get_dsv3_decoder_block_spec"], "--spec"),
    (["--export-hf", "/tmp/x"], "--load"),
    (["--use-distributed-optimizer", "--load", "/tmp/ckpt"], "--use-distributed-optimizer"),
])
def test_bad_launch_names_the_flag(extra, flag):
    assert flag in _fails(*extra)


def test_hf_config_needs_the_training_coefficients(tmp_path):
    """A HF config.json has no alpha / gamma / lambda: each is asked for by flag, never 0."""
    import json

    from megatron_dsv3.config import DSv3Config

    cfg = DSv3Config.from_preset("tiny").hf_dict()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    base = [a for a in TINY if a not in ("--dsv3-preset", "tiny")] + ["--dsv3-hf-config", str(tmp_path)]
    msg = _fails(base=base)
    for flag in ("--moe-aux-loss-coeff", "--moe-router-bias-update-rate", "--mtp-loss-scaling-factor"):
        assert flag in msg
    args = _prepare("--moe-aux-loss-coeff", "0", "--moe-router-bias-update-schedule", "0:0.002,1B:0",
                    "--mtp-loss-scaling-factor", "0.1", base=base)
    assert (args.dsv3_fields["seq_aux_alpha"], args.dsv3_fields["bias_update_rate"],
            args.dsv3_fields["mtp_lambda"]) == (0.0, 0.002, 0.1)
    assert "not both" in _fails("--moe-router-bias-update-rate", "0.001",
                                "--moe-router-bias-update-schedule", "0:0.001")


def test_data_path_missing_names_the_flag(tmp_path):
    base = [a for a in TINY if a != "--mock-data"]
    assert "--data-path" in _fails("--data-path", str(tmp_path / "nothing_text_document"), base=base)
    assert "--data-path" in _fails(base=base)  # no data at all


def test_split_with_no_document_is_refused(tmp_path):
    """10 documents with --split 98,2,0: the validation split is empty and Megatron would hang."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "ten")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for i in range(10):
        builder.add_document(torch.arange(5 + i), [5 + i])
    builder.finalize(prefix + ".idx")
    base = [a for a in TINY if a not in ("--mock-data",)]
    base = [a if a != "98,1,1" else "98,2,0" for a in base]
    msg = _fails("--data-path", prefix, "--eval-iters", "1", base=base)
    assert "--split" in msg and "validation" in msg
    args = _prepare("--data-path", prefix, base=base)   # with --eval-iters 0 the empty split is unused
    assert args.data_path == [prefix]


def test_fp8_without_transformer_engine_and_cpu():
    assert importlib.util.find_spec("transformer_engine") is None
    base = [a for a in TINY if a != "--cpu"]
    msg = _fails("--transformer-impl", "local", "--fp8-format", "e4m3", base=base)
    assert "--fp8-format" in msg and "Transformer Engine" in msg
    msg = _fails(base=base)   # on a GPU machine without TE the default transformer_impl needs it
    assert "--transformer-impl" in msg
    assert "--cpu" in _fails("--fp8-format", "e4m3")


def test_flags_override_the_preset_and_reach_megatron_args():
    args = _prepare("--num-experts", "16", "--moe-router-topk", "4", "--q-lora-rank", "48",
                    "--moe-aux-loss-coeff", "0.001", "--first-k-dense-replace", "2",
                    "--moe-router-bias-update-schedule", "0:0.001,1M:0")
    f = args.dsv3_fields
    assert (f["n_routed_experts"], f["num_experts_per_tok"], f["q_lora_rank"], f["seq_aux_alpha"],
            f["first_k_dense_replace"]) == (16, 4, 48, 0.001, 2)
    assert args.num_experts == 16 and args.moe_router_topk == 4 and args.moe_layer_freq == [0, 0, 1, 1]
    assert args.moe_aux_loss_coeff == 0.001 and args.moe_router_load_balancing_type == ["seq_aux_loss"]
    assert args.multi_latent_attention and args.position_embedding_type == "none"
    assert args.moe_shared_expert_intermediate_size == 32 and args.kv_channels == 16
    assert args.hidden_dropout == 0.0 and args.attention_dropout == 0.0   # DSv3: no dropout
    assert args.transformer_impl == "local" and args.distributed_backend == "gloo"   # --cpu


def test_model_config_from_args_matches_the_preset():
    """The config the launcher builds equals DSv3Config.from_preset with the same parallel layout."""
    from megatron.training.arguments import validate_args

    from megatron_dsv3.config import DSv3Config, cpu_overrides
    from megatron_dsv3.model.mla import mla_softmax_scale

    args = _prepare()
    validate_args(args, {})
    cfg = pretrain.model_config_from_args(pretrain._with(args, padded_vocab_size=256))
    ref = DSv3Config.from_preset("tiny", num_layers=4, **cpu_overrides())
    for name in ("num_moe_experts", "moe_router_topk", "moe_router_group_topk", "moe_router_num_groups",
                 "moe_router_topk_scaling_factor", "moe_aux_loss_coeff", "moe_router_bias_update_rate",
                 "moe_layer_freq", "q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim",
                 "v_head_dim", "kv_channels", "rope_type", "rotary_scaling_factor", "mscale",
                 "mscale_all_dim", "mtp_num_layers", "mtp_loss_scaling_factor", "layernorm_epsilon",
                 "moe_shared_expert_intermediate_size", "ffn_hidden_size", "hidden_size", "num_layers",
                 "normalization", "add_bias_linear", "qk_layernorm"):
        assert getattr(cfg, name) == getattr(ref, name), name
    assert mla_softmax_scale(cfg) == mla_softmax_scale(ref)


def test_launcher_exits_with_the_message_before_torch_distributed():
    """End to end through torchrun: one clean line on stderr, exit code 1, no traceback."""
    cmd = [sys.executable, "-m", "megatron_dsv3.pretrain", *TINY, "--train-iters", "2",
           "--expert-model-parallel-size", "3"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, WORLD_SIZE="1", RANK="0"))
    assert out.returncode != 0
    assert "dsv3-pretrain: error: --num-experts 8 is not divisible by --expert-model-parallel-size 3" in out.stderr
    assert "Traceback" not in out.stderr
