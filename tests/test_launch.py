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
def _launch_checks_build_no_process_group(no_process_groups):
    """Every test here runs launch checks only (tests/conftest.py: no_process_groups)."""


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
    """A HF config.json has no gamma / lambda (and alpha only as aux_loss_alpha): each missing one is
    asked for by flag, never 0."""
    import json

    from megatron_dsv3.config import DSv3Config

    cfg = DSv3Config.from_preset("tiny").hf_dict()
    assert cfg["aux_loss_alpha"] == 1e-4 and cfg["seq_aux"] is True
    del cfg["aux_loss_alpha"], cfg["seq_aux"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    base = [a for a in TINY if a not in ("--dsv3-preset", "tiny")] + ["--dsv3-hf-config", str(tmp_path)]
    msg = _fails(base=base)
    for flag in ("--moe-aux-loss-coeff", "--moe-router-bias-update-rate", "--mtp-loss-scaling-factor"):
        assert flag in msg
    with_alpha = tmp_path / "with_alpha"
    with_alpha.mkdir()
    (with_alpha / "config.json").write_text(json.dumps({**cfg, "aux_loss_alpha": 1e-4, "seq_aux": True}))
    msg = _fails(base=[a for a in base if a != str(tmp_path)] + [str(with_alpha)])
    assert "--moe-aux-loss-coeff" not in msg and "--moe-router-bias-update-rate" in msg
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


# ----------------------------------------------------------------------------------------------
# Issue 8: bad inputs that used to crash without a message are refused at launch, naming the flag
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, flag", [
    (["--seq-length", "0"], "--seq-length 0"),                  # SIGFPE in the model before
    (["--micro-batch-size", "0"], "--micro-batch-size 0"),
    (["--lr", "-1"], "--lr -1"),
    (["--lr", "nan"], "--lr nan"),
    (["--lr", "inf"], "--lr inf"),
    (["--num-layers", "0"], "--num-layers 0"),
    (["--train-iters", "0"], "--train-iters 0"),
    (["--global-batch-size", "0"], "--global-batch-size 0"),
    (["--global-batch-size", "5"], "--global-batch-size 5"),    # Megatron: its eval batch assertion
    (["--eval-micro-batch-size", "3"], "--eval-micro-batch-size 3"),
    (["--eval-interval", "0"], "--eval-interval 0"),
    (["--log-interval", "0"], "--log-interval 0"),
    (["--eval-iters", "-1"], "--eval-iters -1"),
    (["--min-lr", "0.1"], "--min-lr 0.1"),
    (["--lr-warmup-iters", "2"], "--lr-warmup-iters 2"),
    (["--clip-grad", "-1"], "--clip-grad -1"),
    (["--adam-beta1", "1"], "--adam-beta1 1"),
    (["--hidden-dropout", "1.5"], "--hidden-dropout 1.5"),
    (["--vocab-size", "0"], "--vocab-size 0"),
    (["--max-position-embeddings", "16"], "--max-position-embeddings 16"),
    (["--split", "a,b"], None),   # (mock data: --split unused, so no error)
])
def test_bad_numbers_name_the_flag(extra, flag):
    if flag is None:
        _prepare(*extra)
        return
    msg = _fails(*extra)
    assert flag in msg, msg
    assert "Traceback" not in msg


def test_eval_interval_is_needed_for_training():
    base = [a for a in TINY if a not in ("--eval-interval", "1000")]
    assert "--eval-interval" in _fails(base=base)       # Megatron: train_iters // None in its sample count


def test_world_size_and_data_parallel_batch(monkeypatch):
    layout = ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--expert-tensor-parallel-size", "1"]
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert "WORLD_SIZE" in _fails(*layout)
    monkeypatch.setenv("WORLD_SIZE", "4")      # TP 2 -> data-parallel size 2
    msg = _fails(*layout, "--global-batch-size", "6")
    assert "--global-batch-size 6" in msg and "data-parallel size 2" in msg
    assert "--seq-length 33" in _fails(*layout, "--seq-length", "33")
    assert _prepare(*layout).global_batch_size == 4


def test_usage_error_is_short_and_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        _prepare("--seq-lenght", "32")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --seq-lenght" in err and "did you mean --seq-length" in err
    assert "--help" in err and len(err.splitlines()) <= 3, err
    with pytest.raises(SystemExit) as info:
        _prepare("--seq-length", "abc")
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--seq-length: invalid int value: 'abc'" in err and len(err.splitlines()) <= 3


def test_tokenizer_model_must_exist(tmp_path):
    hf = ["--tokenizer-type", "HuggingFaceTokenizer"]
    for missing in (str(tmp_path / "no_tokenizer"), "./tok", str(tmp_path)[1:] + "/x/y"):
        msg = _fails(*hf, "--tokenizer-model", missing)
        assert f"--tokenizer-model {missing}: no such directory" in msg
    assert "--tokenizer-model" in _fails(*hf)
    _prepare(*hf, "--tokenizer-model", "deepseek-ai/DeepSeek-V3")    # a hub id is not checked here
    base = [a for a in TINY if a not in ("--vocab-size", "255")]
    assert "--vocab-size" in _fails(base=base)                        # NullTokenizer needs it


# ----------------------------------------------------------------------------------------------
# Data: index files, blend weights, what the run will read, token ids
# ----------------------------------------------------------------------------------------------
DATA_BASE = [a for a in TINY if a != "--mock-data"]


def _dataset(prefix, docs, dtype=np.uint16):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in docs:
        builder.add_document(torch.tensor(doc), [len(doc)])
    builder.finalize(prefix + ".idx")
    return prefix


@pytest.fixture
def ten(tmp_path):
    return _dataset(str(tmp_path / "ten"), [list(range(1 + i, 6 + 2 * i)) for i in range(10)])


def _data(*extra, prefix, split="98,1,1"):
    base = [a if a != "98,1,1" else split for a in DATA_BASE]
    return ["--data-path", prefix, *extra], base


def test_split_without_the_validation_set_the_run_evaluates_on(ten):
    """--split 100,0,0 --eval-iters 2 crashed in Megatron's evaluation after the last step."""
    extra, base = _data("--eval-iters", "2", prefix=ten, split="100,0,0")
    msg = _fails(*extra, base=base)
    assert "--split 100,0,0" in msg and "validation" in msg and "--eval-iters 2" in msg
    extra, base = _data("--eval-iters", "0", prefix=ten, split="100,0,0")
    _prepare(*extra, base=base)
    extra, base = _data("--eval-iters", "2", prefix=ten, split="50,50,0")
    _prepare(*extra, base=base)          # no test share: Megatron skips the test evaluation
    extra, base = _data(prefix=ten, split="0,50,50")
    assert "train" in _fails(*extra, base=base)
    for bad in ("a,b", "1,2,3,4", "0,0,0", "1,-1,1"):
        extra, base = _data(prefix=ten, split=bad)
        assert f"--split {bad!r}" in _fails(*extra, base=base)


def test_per_split_paths_need_what_the_run_reads(ten):
    base = [a for a in DATA_BASE if a not in ("--split", "98,1,1")]
    msg = _fails("--train-data-path", ten, "--eval-iters", "2", base=base)
    assert "--valid-data-path" in msg and "--eval-iters 2" in msg
    _prepare("--train-data-path", ten, base=base)
    assert "--split" in _fails("--train-data-path", ten, "--split", "99,1,0", base=base)
    assert "not both" in _fails("--data-path", ten, "--train-data-path", ten, base=base)


def test_blend_weights(ten):
    for (a, b), why in ((("-0.5", "1.5"), "blend weight -0.5"), (("nan", "1"), "blend weight nan"),
                        (("0", "0"), "sum to 0")):
        msg = _fails("--data-path", a, ten, b, ten, base=DATA_BASE)
        assert why in msg and "--data-path" in msg
    assert "stands where a blend weight belongs" in _fails("--data-path", "0.5", ten, ten, ten, base=DATA_BASE)
    _prepare("--data-path", "0.3", ten, "0.7", ten, base=DATA_BASE)


def _damaged(src, dst, suffix, edit):
    import shutil

    for s in (".bin", ".idx"):
        shutil.copy(src + s, dst + s)
    with open(dst + suffix, "rb") as f:
        data = f.read()
    with open(dst + suffix, "wb") as f:
        f.write(edit(data))
    return dst


@pytest.mark.parametrize("suffix, edit, why", [
    (".bin", lambda b: b[:-10], "is truncated"),
    (".bin", lambda b: b"", "is truncated"),
    (".bin", lambda b: b + b"\0\0", "do not belong together"),
    (".idx", lambda b: b[:-8], "is truncated"),
    (".idx", lambda b: b[:20], "is truncated"),
    (".idx", lambda b: b"XXXXXXXXX" + b[9:], "not a Megatron index file"),
    (".idx", lambda b: b[:9] + (2).to_bytes(8, "little") + b[17:], "index version 2"),
])
def test_damaged_data_files_are_named(ten, tmp_path, suffix, edit, why):
    prefix = _damaged(ten, str(tmp_path / "bad"), suffix, edit)
    msg = _fails("--data-path", prefix, base=DATA_BASE)
    assert f"{prefix}{suffix}" in msg and why in msg and "--data-path" in msg, msg
    assert "Traceback" not in msg


def test_token_ids_beyond_the_vocabulary_are_named(tmp_path):
    """NullTokenizer --vocab-size 255 pads to 256 embedding rows: id 256 would be an IndexError."""
    ok = _dataset(str(tmp_path / "ok"), [[1, 2, 3], [255, 4]])
    _prepare("--data-path", ok, base=DATA_BASE)
    bad = _dataset(str(tmp_path / "bad"), [[1, 2, 3], [4, 5], [6, 300, 7]])
    msg = _fails("--data-path", bad, base=DATA_BASE)
    assert f"{bad}.bin holds token id 300 (token 6, document 2)" in msg and "256" in msg and "--vocab-size 255" in msg
    wide = _dataset(str(tmp_path / "wide"), [[1, 2], [-1, 3]], dtype=np.int32)
    assert "token id -1" in _fails("--data-path", wide, base=DATA_BASE)


def test_token_id_check_is_sampled(tmp_path, monkeypatch):
    """Large .bin files are sampled (first and last windows always): bounded work, said in the message."""
    from megatron_dsv3.training import checks

    monkeypatch.setattr(checks, "TOKEN_SAMPLE_BYTES", 64)       # 32 uint16 tokens in 4 windows of 8
    monkeypatch.setattr(checks, "TOKEN_SAMPLE_WINDOWS", 4)
    docs = [[1] * 10 for _ in range(20)]                           # 200 tokens
    docs[-1][-1] = 999
    msg = _fails("--data-path", _dataset(str(tmp_path / "last"), docs), base=DATA_BASE)
    assert "token id 999 (token 199, document 19)" in msg and "4 samples" in msg
    docs[-1][-1], docs[9][0] = 1, 999                              # token 90: between the windows
    _prepare("--data-path", _dataset(str(tmp_path / "middle"), docs), base=DATA_BASE)


def test_free_port_is_bindable_and_outside_the_ephemeral_range():
    """Rendezvous ports come from below the kernel's ephemeral range, which outgoing connections (gloo
    opens many) also draw from: a port picked there could be taken before the rendezvous binds it."""
    import socket

    from megatron_dsv3.parallel import world

    low = world._ephemeral_low()
    ports = {world.free_port() for _ in range(16)}
    assert len(ports) > 1
    for port in ports:
        assert low <= 11000 or 10000 <= port < low, (port, low)
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
