"""FP8: the CPU emulation of DeepSeek-V3's recipe (model/fp8_emulation.py) and the FP8 launch rules
(training/fp8.py).

- quantisation equals an independent loop over the tiles / blocks, bit for bit (codes and scales);
- the blocked GEMM equals float64 arithmetic on the quantised operands (the fp32 accumulation is the
  only difference);
- a layer's output, input gradient and weight gradient are within the error bound derived from e4m3's
  rounding (relative 2^-4, absolute 2^-10 x the tile scale in the subnormal range) of the exact fp64
  results, the gradients follow Figure 6 exactly (Dgrad: dy 1x128 x W 128x128; Wgrad: dy and the
  FP8-cached x re-tiled 128x1);
- the emulated model puts exactly the TE map's linears in FP8 (head and MTP eh_proj not);
- every FP8 misconfiguration stops the launch with its message; the machine rules (TE version per
  recipe, GPU, FP8 / blockwise support) with a simulated machine;
- the short loss-error benchmark (tools/bench_fp8.py): emulated FP8 changes the loss, by less than
  the report's 0.25%.
GPU + Transformer Engine (tools/gpu_check.sh): the TE build runs exactly the same map in FP8.
"""
from __future__ import annotations

import argparse
import importlib.util
import re
import json
import os
import subprocess
import sys

import pytest
import torch

from launch import ROOT, TINY
from megatron_dsv3.model import fp8_emulation as fe

U = 2.0 ** -4          # e4m3 unit roundoff (3 mantissa bits, round to nearest)
SUB = 2.0 ** -10       # half the subnormal spacing (2^-9) of e4m3, in units of the tile scale


# ----------------------------------------------------------------------------------------------
# Independent reference: a loop over the tiles
# ----------------------------------------------------------------------------------------------
def loop_quantize(x: torch.Tensor, br: int, bc: int):
    R, C = x.shape
    q = torch.empty(R, C, dtype=torch.float8_e4m3fn)
    scales = torch.empty((R + br - 1) // br, (C + bc - 1) // bc)
    for i in range(0, R, br):
        for j in range(0, C, bc):
            tile = x[i:i + br, j:j + bc].float()
            amax = tile.abs().max()
            s = amax / 448.0 if amax > 0 else torch.tensor(1.0)
            scales[i // br, j // bc] = s
            q[i:i + br, j:j + bc] = torch.clamp(tile / s, -448.0, 448.0).to(torch.float8_e4m3fn)
    return q, scales


def loop_dequantize(q, scales, br, bc) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=torch.float64)
    for i in range(0, q.shape[0], br):
        for j in range(0, q.shape[1], bc):
            out[i:i + br, j:j + bc] = q[i:i + br, j:j + bc].double() * float(scales[i // br, j // bc])
    return out


def _data(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * torch.exp(torch.randn(*shape, generator=g))   # wide dynamic range
    return x


@pytest.mark.parametrize("block", [(1, 128), (128, 128), (128, 1)])
def test_quantize_equals_a_loop_over_the_tiles(block):
    x = _data(300, 260)                  # partial tiles at both edges
    x[:128, :128] = 0                    # an all-zero tile (scale 1)
    x[5, 200] = 1e4                      # one large outlier in its tile
    q, s = fe.quantize(x, block)
    q_ref, s_ref = loop_quantize(x, *block)
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    deq = fe.dequantize(q, s, block).double()
    assert torch.allclose(deq, loop_dequantize(q_ref, s_ref, *block), rtol=1e-7, atol=0)
    # every tile's largest value maps to +-448 (the full e4m3 range is used)
    assert q.float().abs().max() == 448.0


def test_block_gemm_is_fp32_accumulation_of_the_quantised_operands():
    x, w = _data(37, 300, seed=1), _data(70, 300, seed=2)
    y = fe.fp8_matmul_reference(x, w).double()
    xd = loop_dequantize(*loop_quantize(x, 1, 128), 1, 128)
    wd = loop_dequantize(*loop_quantize(w, 128, 128), 128, 128)
    exact = xd @ wd.t()
    assert torch.allclose(y, exact, rtol=0, atol=float(1e-5 * (xd.abs() @ wd.abs().t()).max()))


# ----------------------------------------------------------------------------------------------
# A layer: output and gradients within the derived bound; Figure 6 exactly
# ----------------------------------------------------------------------------------------------
def _err(x: torch.Tensor, br: int, bc: int) -> torch.Tensor:
    """Elementwise bound on |Q(x) - x|: U |x| + SUB x tile scale (fp64)."""
    _, s = loop_quantize(x, br, bc)
    scale = s.double().repeat_interleave(br, 0)[: x.shape[0]].repeat_interleave(bc, 1)[:, : x.shape[1]]
    return U * x.double().abs() + SUB * scale


def _product_bound(a, ea, b, eb, k) -> torch.Tensor:
    """|Qa Qb^T - a b^T| <= ea |b|^T + |a| eb^T + ea eb^T, plus fp32 accumulation over k terms."""
    a, b = a.double().abs(), b.double().abs()
    gamma = (k // 128 + 130) * 2.0 ** -24
    return ea @ b.t() + a @ eb.t() + ea @ eb.t() + gamma * ((a + ea) @ (b + eb).t())


def test_layer_output_and_gradients_within_the_derived_bound_and_as_figure_6():
    M, K, N = 200, 300, 150
    x = _data(M, K, seed=3).requires_grad_(True)
    w = (_data(N, K, seed=4) * 0.05).requires_grad_(True)
    dy = _data(M, N, seed=5)
    y = fe.fp8_linear(x, w)
    y.backward(dy)
    xd, wd, dyd = x.detach().double(), w.detach().double(), dy.double()

    # Fprop: x 1x128, W 128x128
    bound = _product_bound(xd, _err(x.detach(), 1, 128), wd, _err(w.detach(), 128, 128), K)
    err = (y.detach().double() - xd @ wd.t()).abs()
    assert (err <= bound).all(), float((err - bound).max())
    assert err.max() > 0 and bound.mean() < 0.3 * (xd.abs() @ wd.abs().t()).mean()

    # Dgrad: dy 1x128 along N, W^T's 128x128 blocks
    bound = _product_bound(dyd, _err(dy, 1, 128), wd.t(), _err(w.detach(), 128, 128).t(), N)
    err = (x.grad.double() - dyd @ wd).abs()
    assert (err <= bound).all(), float((err - bound).max())
    exact = loop_dequantize(*loop_quantize(dy, 1, 128), 1, 128) @ loop_dequantize(*loop_quantize(w.detach(), 128, 128),
                                                                                  128, 128)
    assert torch.allclose(x.grad.double(), exact, rtol=0, atol=1e-5 * float(exact.abs().max()))

    # Wgrad: dy^T x over the tokens; dy 128x1, x = its FP8 cache (1x128) re-tiled 128x1
    z = loop_dequantize(*loop_quantize(x.detach(), 1, 128), 1, 128)          # the cached activation
    e_x = _err(x.detach(), 1, 128) + _err(z.float(), 128, 1)                 # two roundings
    bound = _product_bound(dyd.t(), _err(dy, 128, 1).t(), xd.t(), e_x.t(), M)
    err = (w.grad.double() - dyd.t() @ xd).abs()
    assert (err <= bound).all(), float((err - bound).max())
    exact = (loop_dequantize(*loop_quantize(dy, 128, 1), 128, 1).t()
             @ loop_dequantize(*loop_quantize(z.float(), 128, 1), 128, 1))
    assert torch.allclose(w.grad.double(), exact, rtol=0, atol=1e-5 * float(exact.abs().max()))


def test_fp8_map_of_the_emulated_model(cpu_world):
    """The decoder's, experts' and MTP layer's linears are FP8; output head and MTP eh_proj are not; the
    router, embedding, norms and attention core are not linears of ours and stay unquantised."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    from megatron_dsv3.config import DSv3Config, cpu_overrides
    from megatron_dsv3.model.mla import DuplicatedLinear
    from megatron_dsv3.spec import build_model

    cfg = fe.enable(DSv3Config.from_preset("tiny", num_layers=2, **cpu_overrides()))
    torch.manual_seed(0)
    model = build_model(cfg)
    fp8_types = (fe.FP8ColumnParallelLinear, fe.FP8RowParallelLinear, fe.FP8DuplicatedLinear)
    names = {n for n, m in model.named_modules() if isinstance(m, fp8_types)}
    plain = {n for n, m in model.named_modules()
             if isinstance(m, (ColumnParallelLinear, DuplicatedLinear)) and not isinstance(m, fp8_types)}
    assert plain == {"output_layer", "mtp.layers.0.eh_proj"}
    for n in names:
        assert n.startswith(("decoder.layers.", "mtp.layers.0.mtp_model_layer.")), n
    for part in ("linear_q_down_proj", "linear_q_up_proj", "linear_kv_down_proj", "linear_kv_up_proj",
                 "self_attention.linear_proj", "mlp.linear_fc1", "experts.local_experts.0.linear_fc1",
                 "shared_experts.linear_fc2"):
        assert any(part in n for n in names), part
    # every FP8 layer runs in the forward (no path around the linear classes), experts included
    called = set()
    for n, m in model.named_modules():
        if isinstance(m, fp8_types):
            m.register_forward_hook(lambda mod, inp, out, n=n: called.add(n))
    ref = build_model(DSv3Config.from_preset("tiny", num_layers=2, **cpu_overrides()))
    ref.load_state_dict(model.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(32).expand(2, 32)
    a, b = model(ids, pos, None, labels=ids).mean(), ref(ids, pos, None, labels=ids).mean()
    assert {n for n in names if ".local_experts." not in n} <= called
    for prefix in ("decoder.layers.1.mlp.experts", "mtp.layers.0.mtp_model_layer.mlp.experts"):
        assert any(n.startswith(prefix) and n.endswith("linear_fc2") for n in called), prefix
    # same weights without emulation: the loss moves, but little
    assert a != b and abs(float(a - b)) / float(b) < 1e-2


# ----------------------------------------------------------------------------------------------
# Launch rules
# ----------------------------------------------------------------------------------------------


def _prepare(*extra):
    from megatron_dsv3.training import launcher

    return launcher.prepare(list(TINY) + ["--train-iters", "2", *extra])


def _fails(*extra) -> str:
    from megatron_dsv3.training.arguments import LaunchError

    with pytest.raises(LaunchError) as info:
        _prepare(*extra)
    return str(info.value.code)


@pytest.mark.parametrize("overrides, message", [
    (dict(transformer_impl="transformer_engine"), "set transformer_impl='local'"),
    (dict(gradient_accumulation_fusion=True), "set gradient_accumulation_fusion=False"),
])
def test_fp8_emulation_field_refuses_what_it_cannot_emulate(overrides, message):
    """DSv3Config.fp8_emulation is a validated field: a config that cannot run the emulated layers is
    refused when it is built (not when the layers are), naming the field to change."""
    from megatron_dsv3.config import DSv3Config, DSv3ConfigError, cpu_overrides

    fields = dict(cpu_overrides(), **overrides)
    with pytest.raises(DSv3ConfigError, match=re.escape(message)):
        DSv3Config.from_preset("tiny", num_layers=2, fp8_emulation=True, **fields)
    assert not fe.enabled(DSv3Config.from_preset("tiny", num_layers=2, **cpu_overrides()))


def test_fp8_emulation_launches_and_marks_the_model(no_process_groups):
    from megatron_dsv3.training import launcher

    def config(*extra):
        args = _prepare(*extra)
        from megatron.training.arguments import validate_args     # (after the launcher's import patch)

        validate_args(args, {})
        return launcher.model_config_from_args(launcher._with(args, padded_vocab_size=256))

    assert fe.enabled(config("--fp8-emulation", "--fp8-recipe", "blockwise"))
    assert not fe.enabled(config())


@pytest.mark.parametrize("extra, message", [
    (["--fp8-recipe", "blockwise"], "--fp8-recipe blockwise acts only with --fp8-format"),
    (["--fp8-emulation", "--fp8-recipe", "delayed"], "--fp8-recipe delayed with --fp8-emulation"),
    (["--fp8-emulation", "--no-fp8-wgrad"], "--no-fp8-wgrad with --fp8-emulation"),
    (["--first-last-layers-bf16"], "--first-last-layers-bf16 acts only with --fp8-format"),
    (["--fp8-format", "hybrid"], "--fp8-format needs Transformer Engine on NVIDIA GPUs; it cannot run with --cpu"),
    (["--fp8-output-proj"], "--fp8-output-proj: "),
    (["--fp8-quantizer-factory", "pkg.f"], "--fp8-quantizer-factory pkg.f: "),
    (["--fp8-emulation", "--pipeline-model-parallel-size", "2", "--pipeline-schedule", "dualpipe"],
     "--fp8-emulation with --pipeline-schedule dualpipe"),
])
def test_fp8_misconfiguration_stops_the_launch(no_process_groups, extra, message):
    msg = _fails(*extra)
    assert msg.startswith(f"dsv3-pretrain: error: {message}"), msg


def _args(**kw):
    base = dict(fp8=None, fp8_recipe="delayed", fp8_emulation=False, cpu=False, transformer_impl="transformer_engine",
                first_last_layers_bf16=False, gradient_accumulation_fusion=True, pipeline_schedule="1f1b",
                fp8_param_gather=False, fp8_wgrad=True)
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.mark.parametrize("kw, given, message", [
    (dict(fp8="e4m3", fp8_recipe="mxfp8"), {"fp8", "fp8_recipe"}, "--fp8-recipe mxfp8: DeepSeek-V3 training"),
    (dict(fp8="e4m3", fp8_recipe="custom"), {"fp8", "fp8_recipe"}, "--fp8-recipe custom: DeepSeek-V3 training"),
    (dict(fp8="hybrid", transformer_impl="local"), {"fp8"}, "--fp8-format hybrid with --transformer-impl local"),
    (dict(fp8="hybrid", fp8_emulation=True, transformer_impl="local"), {"fp8", "fp8_emulation"},
     "--fp8-emulation with --fp8-format"),
    (dict(fp8="e4m3", first_last_layers_bf16=True), {"fp8", "first_last_layers_bf16"},
     "--first-last-layers-bf16 with --fp8-recipe delayed"),
    (dict(fp8_emulation=True), {"fp8_emulation"}, "--fp8-emulation replaces Megatron-Core's local linear"),
    (dict(activation_func_fp8_input_store=True), set(), "--activation-func-fp8-input-store is Transformer Engine's"),
    (dict(fp8_emulation=True, transformer_impl="local"), {"fp8_emulation"}, "--fp8-emulation computes its own"),
    (dict(fp8_emulation=True, transformer_impl="local", gradient_accumulation_fusion=False, fp8_param_gather=True),
     {"fp8_emulation"}, "--fp8-param-gather needs Transformer Engine"),
])
def test_fp8_flag_rules(kw, given, message):
    from megatron_dsv3.training.fp8 import fp8_flag_problems

    found = fp8_flag_problems(_args(**kw), given)
    assert any(m.startswith(message) for m in found), found
    for m in found:
        assert any(w in m for w in ("use ", "give ", "drop ", "add ")), m


def _machine(version="2.4.0", gpu=True, fp8=(True, ""), blockwise=(True, "")):
    from packaging.version import Version

    return {"version": version, "min_version": lambda v: Version(version) >= Version(v), "gpu": gpu,
            "fp8": fp8, "blockwise": blockwise}


@pytest.mark.parametrize("kw, machine, message", [
    (dict(fp8="e4m3", fp8_recipe="blockwise"), _machine(version="2.1.0"),
     "--fp8-recipe blockwise needs Transformer Engine >= 2.3.0.dev0 (installed: 2.1.0)"),
    (dict(fp8="e4m3", fp8_recipe="tensorwise"), _machine(version="2.1.0"),
     "--fp8-recipe tensorwise needs Transformer Engine >= 2.2.0.dev0"),
    (dict(fp8="hybrid"), _machine(gpu=False), "--fp8-format hybrid needs an NVIDIA GPU"),
    (dict(fp8="hybrid"), _machine(fp8=(False, "compute capability 8.0")), "--fp8-format hybrid: this GPU cannot"),
    (dict(fp8="e4m3", fp8_recipe="blockwise"), _machine(blockwise=(False, "needs sm90")),
     "--fp8-recipe blockwise: this GPU / Transformer Engine cannot run blockwise FP8 (needs sm90)"),
])
def test_fp8_machine_rules(kw, machine, message):
    from megatron_dsv3.training.fp8 import fp8_machine_problems

    found = fp8_machine_problems(_args(**kw), machine)
    assert found and found[0].startswith(message), found
    assert not fp8_machine_problems(_args(**kw), _machine())       # a machine that has it all


def test_machine_rules_run_in_the_launch(no_process_groups, monkeypatch):
    """check_fp8 is what check_launch calls: the machine probe's answer reaches the launch."""
    from megatron_dsv3.training import fp8 as fp8_rules
    from megatron_dsv3.training.arguments import LaunchError

    monkeypatch.setattr(fp8_rules, "te_status", lambda: _machine(version="2.2.0"))
    with pytest.raises(LaunchError, match="blockwise needs Transformer Engine >= 2.3"):
        fp8_rules.check_fp8(_args(fp8="e4m3", fp8_recipe="blockwise"), {"fp8", "fp8_recipe"})


# ----------------------------------------------------------------------------------------------
# The loss-error benchmark, short
# ----------------------------------------------------------------------------------------------
def test_bench_fp8_short_run_stays_under_the_report_bound(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench_fp8.py"), "--nproc", "1", "--iters",
                          "12", "--out", str(tmp_path), "--json"], cwd=ROOT, capture_output=True, text=True,
                         timeout=900, env=dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1"))
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(result["steps"]) == 12
    assert result["loss_fp32"][-1] < result["loss_fp32"][0] - 0.5          # it trains
    assert 0 < result["max_rel_error"] < 0.0025, result["rel_error"]      # FP8 acts, within the report's 0.25%


# ----------------------------------------------------------------------------------------------
# GPU + Transformer Engine only (tools/gpu_check.sh)
# ----------------------------------------------------------------------------------------------
_GPU_TE = torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


@pytest.mark.skipif(not _GPU_TE, reason="needs a CUDA GPU and Transformer Engine (tools/gpu_check.sh)")
@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "blockwise"])
def test_te_build_runs_the_report_map_in_fp8(recipe):  # pragma: no cover - GPU only
    """On Transformer Engine, each recipe trains a step, and after the forward exactly the TE linears of
    the decoder and the MTP decoder layer ran with FP8 on (TE sets module.fp8 in forward); eh_proj ran
    without; head and router are not TE modules."""
    code = f"""
import torch, transformer_engine.pytorch as te
from megatron_dsv3.parallel.world import init_world, init_model_parallel
from megatron_dsv3.config import DSv3Config
from megatron_dsv3.spec import build_model
from megatron_dsv3.training.fp8 import fp8_machine_problems
import argparse
problems = fp8_machine_problems(argparse.Namespace(fp8="e4m3", fp8_recipe="{recipe}", fp8_emulation=False))
if problems:
    print("SKIP", problems); raise SystemExit(0)
init_world(0, 1, backend="nccl"); init_model_parallel()
torch.cuda.set_device(0)
cfg = DSv3Config.from_preset("tiny", num_layers=2, hidden_size=256, num_attention_heads=4, q_lora_rank=128,
                             kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64,
                             ffn_hidden_size=512, moe_intermediate_size=128, transformer_impl="transformer_engine",
                             fp8="e4m3", fp8_recipe="{recipe}", bf16=True, params_dtype=torch.bfloat16,
                             max_position_embeddings=256, rope_scaling=None, moe_token_dispatcher_type="alltoall",
                             moe_router_padding_for_quantization=True)   # FP8 GEMMs: tokens per expert % 16
model = build_model(cfg).cuda()
ids = torch.randint(0, cfg.vocab_size, (2, 128), device="cuda"); pos = torch.arange(128, device="cuda").expand(2, 128)
loss = model(ids, pos, None, labels=ids).float().mean()
loss.backward()
fp8_on = {{n: bool(getattr(m, "fp8", False)) for n, m in model.named_modules()
          if isinstance(m, te.module.base.TransformerEngineBaseModule) and "norm" not in type(m).__name__.lower()}}
off = sorted(n for n, v in fp8_on.items() if not v)
assert off == ["mtp.layers.0.eh_proj"], off
assert not isinstance(model.output_layer, te.module.base.TransformerEngineBaseModule)
print("OK", len(fp8_on), "TE linears,", sum(fp8_on.values()), "in FP8, loss", float(loss))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT="29561"))
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    if out.stdout.startswith("SKIP"):
        pytest.skip(out.stdout.strip())
    assert out.stdout.startswith("OK"), out.stdout
