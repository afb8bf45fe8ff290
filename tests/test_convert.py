"""dsv3-convert (HF <-> Megatron torch_dist) and dsv3-pretrain --hf-checkpoint.

Small synthetic checkpoints of the launcher's tiny model (tests/convert_synth.py writes every tensor
config.json implies, from shapes computed there). What is checked:
  - HF -> mcore -> HF reproduces every tensor bit for bit (bf16 and fp32 sources), also through the
    launcher at TP2 x EP2 x PP2 (4 gloo ranks) loading the converted checkpoint and saving it again
    with no training step (Megatron's --ckpt-convert-format);
  - --fp8 writes exactly the tensors DeepSeek's release stores in FP8, and importing that reproduces
    the dequantised weights exactly (an independent block loop, and hf.load's reader);
  - the converted checkpoint loaded at world 1 gives --hf-checkpoint's first-step loss bit for bit, at
    TP2 x EP2 and PP2 x EP2 within 1e-5 relative; --hf-checkpoint under DualPipe (PP2, two model copies per rank) gives world 1's first loss on the
    same 4 micro-batches (<= 1e-5 relative); --hf-checkpoint at TP2 x EP2 x PP2 saves the original bits;
  - a missing / extra / mis-shaped tensor or a config not matching the weights is an error naming the
    tensor, and nothing named like the output is left; --hf-checkpoint refuses a config at launch;
  - a conversion killed mid-way (SIGKILL) and rerun produces identical files, in both directions.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import convert_synth as synth
from launch import LAYOUTS, ROOT, TINY, metrics, run_ok

from megatron_dsv3.checkpoint import convert
from megatron_dsv3.checkpoint.staging import ConvertError

ENV = dict(os.environ, MEGATRON_DSV3_CPU="1", TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """bf16 and fp32 HF checkpoints of the launcher's tiny model (4 layers, vocab 256), sharded."""
    root = tmp_path_factory.mktemp("convert")
    out = {}
    for i, dtype in enumerate((torch.bfloat16, torch.float32)):
        path = root / f"hf_{str(dtype)[6:]}"
        synth.write_checkpoint(str(path), synth.tiny_config(), dtype, seed=3 + i, shard_bytes=150_000)
        out[dtype] = path
    return root, out


@pytest.fixture(scope="module")
def converted(sources):
    """The bf16 source converted once (used by the FP8, launcher and error tests)."""
    root, src = sources
    mcore = root / "mcore_bf16"
    convert.hf_to_mcore(str(src[torch.bfloat16]), str(mcore), progress=False)
    return mcore


def _same_tensors(a_dir, b_dir):
    a, b = synth.read_all(str(a_dir)), synth.read_all(str(b_dir))
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, (k, a[k].dtype, b[k].dtype)
        assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k     # bit for bit (NaN too)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_round_trip_is_bit_exact(sources, tmp_path, dtype):
    from megatron_dsv3.checkpoint import manifest
    from megatron_dsv3.checkpoint.mcore_io import DCPReader

    _, src = sources
    mcore, back = tmp_path / "mcore", tmp_path / "hf"
    convert.hf_to_mcore(str(src[dtype]), str(mcore), progress=False)
    assert (mcore / "latest_checkpointed_iteration.txt").read_text() == "release"
    problems, _ = manifest.verify(str(mcore / "release"))
    assert problems == []
    reader = DCPReader(str(mcore / "release"))
    stored = {reader.tensor(k).properties.dtype for k in reader.keys() if reader.tensor(k) is not None}
    assert stored == ({dtype, torch.float32} if dtype == torch.bfloat16 else {torch.float32})   # bias fp32
    convert.mcore_to_hf(str(mcore), str(back), progress=False)
    _same_tensors(src[dtype], back)
    original = json.loads((src[dtype] / "config.json").read_text())
    assert json.loads((back / "config.json").read_text()) == original
    assert json.loads((mcore / "config.json").read_text()) == original      # --dsv3-hf-config OUT works
    assert len([f for f in os.listdir(back) if f.endswith(".safetensors")]) == 1
    assert not os.path.exists(str(mcore) + ".partial") and not os.path.exists(str(back) + ".partial")


def test_dry_run_prints_the_plan_and_writes_nothing(sources, converted, tmp_path, capsys):
    _, src = sources
    plan = convert.hf_to_mcore(str(src[torch.bfloat16]), str(tmp_path / "a"), dry_run=True)
    text = capsys.readouterr().out
    assert plan["items"] == len(synth.tensor_shapes(synth.tiny_config())) == 173
    for word in ("173 tensors", "__0_0.distcp", "expected peak", "dsv3_manifest.json"):
        assert word in text, text
    plan = convert.mcore_to_hf(str(converted), str(tmp_path / "b"), fp8=True, shard_size="200KB", dry_run=True)
    text = capsys.readouterr().out
    assert len(plan["files"]) > 1 and plan["files"][0] in text and "FP8" in text and "expected peak" in text
    assert os.listdir(tmp_path) == []


#: the tensors DeepSeek-V3's release stores in FP8 (decoder-layer linears incl. experts, MTP's too)
FP8_NAMES = re.compile(r"model\.layers\.\d+\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|"
                       r"o_proj)|mlp\.(gate_proj|up_proj|down_proj)|mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)|"
                       r"mlp\.shared_experts\.(gate_proj|up_proj|down_proj))\.weight")


def _dequantise(q, s):
    out = torch.empty(q.shape, dtype=torch.float32)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = (slice(i * 128, (i + 1) * 128), slice(j * 128, (j + 1) * 128))
            out[blk] = q[blk].float() * s[i, j]
    return out


def test_fp8_export_then_import_is_the_dequantised_weights(sources, converted, tmp_path, cpu_world):
    from megatron_dsv3 import hf

    _, src = sources
    fp8_dir, mcore, back = tmp_path / "fp8", tmp_path / "mcore", tmp_path / "back"
    convert.mcore_to_hf(str(converted), str(fp8_dir), fp8=True, progress=False)
    q = synth.read_all(str(fp8_dir))
    original = synth.read_all(str(src[torch.bfloat16]))
    weights = {k for k in q if not k.endswith("_scale_inv")}
    assert weights == set(original)
    fp8 = {k for k in weights if q[k].dtype == torch.float8_e4m3fn}
    # 5 layers (4 + MTP) x 5 attention linears, the dense layer's 3, 4 MoE layers x (8 experts + shared) x 3
    assert fp8 == {k for k in weights if FP8_NAMES.fullmatch(k)} and len(fp8) == 5 * 5 + 3 + 4 * 9 * 3
    assert {k for k in q if k.endswith("_scale_inv")} == {k[: -len("weight")] + "weight_scale_inv" for k in fp8}
    assert all(q[k].dtype == torch.bfloat16 for k in weights - fp8 if not k.endswith("bias"))
    assert all(q[k].dtype == torch.float32 for k in weights if k.endswith("e_score_correction_bias"))
    cfg = json.loads((fp8_dir / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    expected = {}
    for k in weights:
        if k in fp8:
            s = q[k[: -len("weight")] + "weight_scale_inv"]
            assert s.dtype == torch.float32 and tuple(s.shape) == (-(-q[k].shape[0] // 128), -(-q[k].shape[1] // 128))
            expected[k] = _dequantise(q[k], s)
            err = (expected[k] - original[k].float()).abs().max()
            assert 0 < err <= 0.07 * original[k].float().abs().max(), k         # FP8 precision, right scale
        else:
            expected[k] = q[k].float()
    convert.hf_to_mcore(str(fp8_dir), str(mcore), dtype="fp32", progress=False)
    convert.mcore_to_hf(str(mcore), str(back), progress=False)
    got = synth.read_all(str(back))
    for k in weights:
        assert got[k].dtype == torch.float32 and torch.equal(got[k], expected[k]), k
    # the same values through hf.load's FP8 reader (a second implementation)
    loaded = hf.to_hf_state_dict(hf.load(str(fp8_dir)))
    for k in fp8:
        assert torch.equal(loaded[k], expected[k]), k


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------
def _variant(src, dst, edit, config_edit=None):
    """A single-file copy of ``src`` with ``edit(state)`` applied (and config.json edited)."""
    os.makedirs(dst)
    state = synth.read_all(str(src))
    edit(state)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(dst, "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    if config_edit:
        config_edit(cfg)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    return dst


def _transposed(name):
    def edit(state):
        state[name] = state[name].t().contiguous()
    return edit


BROKEN = {
    "missing": (lambda s: s.pop("model.layers.2.mlp.experts.5.up_proj.weight"), None,
                "model.layers.2.mlp.experts.5.up_proj.weight"),
    "extra": (lambda s: s.update({"model.layers.2.mlp.experts.8.up_proj.weight": torch.zeros(32, 64)}), None,
              "model.layers.2.mlp.experts.8.up_proj.weight"),
    "misshaped": (_transposed("model.layers.1.self_attn.q_a_proj.weight"), None,
                  "model.layers.1.self_attn.q_a_proj.weight: shape (64, 32)"),
    "config_more_experts": (lambda s: None, lambda c: c.update(n_routed_experts=16),
                            "model.layers.1.mlp.experts.8.gate_proj.weight"),
    "config_wider_ffn": (lambda s: None, lambda c: c.update(moe_intermediate_size=48),
                         "model.layers.1.mlp.experts.0.gate_proj.weight: shape (32, 64)"),
    "fp8_without_scale": (lambda s: s.update({"model.layers.0.self_attn.o_proj.weight":
                                              s["model.layers.0.self_attn.o_proj.weight"].to(torch.float8_e4m3fn)}),
                          None, "'model.layers.0.self_attn.o_proj.weight' has no"),
    "mtp_copy_differs": (lambda s: s["model.layers.4.embed_tokens.weight"].__setitem__((3, 5), 7.0), None,
                         "model.layers.4.embed_tokens.weight differs from model.embed_tokens.weight"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_hf_to_mcore_errors_name_the_tensor_and_leave_no_checkpoint(sources, tmp_path, case):
    _, src = sources
    edit, config_edit, words = BROKEN[case]
    bad = _variant(src[torch.bfloat16], str(tmp_path / "bad"), edit, config_edit)
    out = tmp_path / "out"
    with pytest.raises(ConvertError) as err:
        convert.hf_to_mcore(bad, str(out), progress=False)
    assert words in str(err.value), str(err.value)
    assert not out.exists()
    if case == "mtp_copy_differs":   # found while converting: the partial directory is not the output name
        assert os.path.isdir(str(out) + ".partial")
        assert not os.path.exists(str(out) + ".partial/latest_checkpointed_iteration.txt")
    else:                            # found before anything is written
        assert not os.path.exists(str(out) + ".partial")


def test_mcore_to_hf_errors_name_the_tensor(converted, tmp_path):
    cfg = json.loads((converted / "config.json").read_text())
    for change, words in (({"n_routed_experts": 16}, "decoder.layers.1.mlp.router.weight: shape (8, 64) in the "
                                                      "checkpoint, but the model config (--hf-config"),
                          ({"num_hidden_layers": 3}, "'decoder.layers.3.input_layernorm.weight'"),
                          ({"num_hidden_layers": 5, "num_nextn_predict_layers": 0},
                           "tensor 'decoder.layers.4.input_layernorm.weight'")):
        path = tmp_path / f"config_{len(os.listdir(tmp_path))}.json"
        path.write_text(json.dumps({**cfg, **change}))
        with pytest.raises(ConvertError) as err:
            convert.mcore_to_hf(str(converted), str(tmp_path / "out"), hf_config=str(path), progress=False)
        assert words in str(err.value), str(err.value)
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    damaged = tmp_path / "damaged"
    shutil.copytree(converted, damaged)
    with open(damaged / "release" / "__0_0.distcp", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ConvertError, match=r"__0_0.distcp has 1000 bytes, the manifest says"):
        convert.mcore_to_hf(str(damaged), str(tmp_path / "out"), progress=False)
    with pytest.raises(ConvertError, match="already exists"):
        convert.mcore_to_hf(str(converted), str(damaged), progress=False)


# ------------------------------------------------------------------------------------------------
# Interrupt and resume
# ------------------------------------------------------------------------------------------------
def _cli(*args, kill_after=None):
    env = dict(ENV)
    if kill_after is not None:
        env["DSV3_CONVERT_KILL_AFTER"] = str(kill_after)
    return subprocess.run([sys.executable, "-m", "megatron_dsv3.checkpoint.convert", *args, "--no-progress"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _tree(path):
    out = {}
    for dirpath, _, files in os.walk(path):
        for f in files:
            full = os.path.join(dirpath, f)
            out[os.path.relpath(full, path)] = open(full, "rb").read()
    return out


@pytest.mark.parametrize("direction", ["hf-to-mcore", "mcore-to-hf"])
def test_killed_conversion_resumes_to_identical_files(sources, converted, tmp_path, direction):
    _, src = sources
    out, ref = tmp_path / "out", tmp_path / "ref"
    if direction == "hf-to-mcore":
        args = ["hf-to-mcore", "--hf", str(src[torch.bfloat16])]
        convert.hf_to_mcore(str(src[torch.bfloat16]), str(ref), progress=False)
        other = ["--dtype", "fp32"]
    else:
        args = ["mcore-to-hf", "--mcore", str(converted), "--fp8", "--shard-size", "200KB"]
        convert.mcore_to_hf(str(converted), str(ref), fp8=True, shard_size="200KB", progress=False)
        other = ["--shard-size", "100KB"]
    for kill in (40, 90):        # killed twice, the second time after continuing the first run
        run = _cli(*args, "--out", str(out), kill_after=kill)
        assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
        assert not out.exists() and (tmp_path / "out.partial").is_dir()
    refused = _cli(*args, "--out", str(out), *other)
    assert refused.returncode == 1 and "other arguments" in refused.stderr and "out.partial" in refused.stderr
    run = _cli(*args, "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    assert not (tmp_path / "out.partial").exists()
    a, b = _tree(out), _tree(ref)
    assert sorted(a) == sorted(b) and len(a) >= 4
    assert [k for k in a if a[k] != b[k]] == []


# ------------------------------------------------------------------------------------------------
# The launcher: the converted checkpoint at several layouts, --hf-checkpoint, a save and export back
# ------------------------------------------------------------------------------------------------
FIRST_STEP = ["--train-iters", "1", "--lr-warmup-iters", "0"]
TP2_EP2_PP2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--pipeline-model-parallel-size", "2",
               "--expert-model-parallel-size", "2", "--expert-tensor-parallel-size", "1"]


@pytest.fixture(scope="module")
def first_steps(sources, converted, tmp_path_factory):
    _, src = sources
    root = tmp_path_factory.mktemp("launch")
    runs = {"hf_world1": (1, [], ["--hf-checkpoint", str(src[torch.bfloat16])])}
    for layout in ("world1", "tp2ep2", "pp2ep2"):
        runs[f"mcore_{layout}"] = (*LAYOUTS[layout], ["--load", str(converted)])
    # DualPipe holds two copies of the model (one per direction): both must start from the HF
    # checkpoint. It needs M >= 2 x PP micro-batches, so this run and its reference take 4.
    gb8 = ["--global-batch-size", "8"]
    dualpipe = gb8 + ["--pipeline-model-parallel-size", "2", "--pipeline-schedule", "dualpipe"]
    runs["gb8_hf_world1"] = (1, gb8, ["--hf-checkpoint", str(src[torch.bfloat16])])
    runs["gb8_hf_dualpipe"] = (2, dualpipe, ["--hf-checkpoint", str(src[torch.bfloat16])])
    out = {}
    for name, (nproc, layout, source) in runs.items():
        jsonl = root / f"{name}.jsonl"
        run_ok(nproc, TINY + FIRST_STEP + layout + source + ["--metrics-jsonl", str(jsonl)])
        out[name] = metrics(str(jsonl))[1]["train/lm_loss"]
    return out


def test_converted_checkpoint_and_hf_checkpoint_give_the_same_first_loss(first_steps):
    ref = first_steps["hf_world1"]
    assert first_steps["mcore_world1"] == ref          # same weights, same layout: the same float
    for name, loss in first_steps.items():
        base = first_steps["gb8_hf_world1"] if name.startswith("gb8_") else ref
        assert abs(loss - base) <= 1e-5 * abs(base), (name, loss, base)
    assert first_steps["gb8_hf_world1"] != ref         # the DualPipe reference is its own batch


@pytest.mark.parametrize("start", ["load_converted", "hf_checkpoint"])
def test_launcher_save_at_tp2_ep2_pp2_exports_the_original_bits(sources, converted, tmp_path, start):
    """At TP2 x EP2 x PP2 (4 ranks) load the converted checkpoint (--load) and save it again with no
    training step (Megatron's --ckpt-convert-format); or start from the HF checkpoint
    (--hf-checkpoint: each rank reads its own shards) and save after one step that changes nothing
    (lr 0, gamma 0). mcore-to-hf of the save = the original HF bits."""
    _, src = sources
    saved = tmp_path / "saved"
    if start == "load_converted":
        run_ok(4, TINY + FIRST_STEP + TP2_EP2_PP2 + ["--load", str(converted), "--ckpt-convert-format", "torch_dist",
                                                     "--ckpt-convert-save", str(saved)])
        saved = saved / "torch_dist"
    else:
        run_ok(4, TINY + FIRST_STEP + TP2_EP2_PP2 + ["--hf-checkpoint", str(src[torch.bfloat16]), "--lr", "0",
                                                     "--min-lr", "0", "--moe-router-bias-update-rate", "0",
                                                     "--save", str(saved), "--save-interval", "1"])
    back = tmp_path / "back"
    convert.mcore_to_hf(str(saved), str(back), dtype="bf16", progress=False)
    _same_tensors(src[torch.bfloat16], back)
    assert json.loads((back / "config.json").read_text()) == json.loads(
        (src[torch.bfloat16] / "config.json").read_text())


def test_hf_checkpoint_with_another_model_is_refused_at_launch(sources, tmp_path, monkeypatch):
    from megatron.core import parallel_state

    from megatron_dsv3.training import launcher as pretrain

    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda *a, **k: pytest.fail("a process group was built during the launch checks"))
    monkeypatch.setattr(parallel_state, "initialize_model_parallel",
                        lambda *a, **k: pytest.fail("model parallel initialised during the launch checks"))
    _, src = sources
    base = TINY + ["--train-iters", "2", "--hf-checkpoint"]
    with pytest.raises(SystemExit) as err:
        pretrain.prepare(base + [str(src[torch.bfloat16]), "--num-experts", "16"])
    msg = str(err.value)
    assert "--hf-checkpoint" in msg and "n_routed_experts 16" in msg and "--num-experts" in msg, msg
    bad = _variant(src[torch.bfloat16], str(tmp_path / "bad"),
                   lambda s: s.pop("model.layers.3.mlp.shared_experts.down_proj.weight"))
    with pytest.raises(SystemExit, match="model.layers.3.mlp.shared_experts.down_proj.weight"):
        pretrain.prepare(base + [bad])
    with pytest.raises(SystemExit, match="embedding has 256 rows but the launched model's vocabulary is 512"):
        pretrain.prepare(base + [str(src[torch.bfloat16]), "--vocab-size", "500"])
    args = pretrain.prepare(base + [str(src[torch.bfloat16])])
    assert args.hf_checkpoint == str(src[torch.bfloat16])
