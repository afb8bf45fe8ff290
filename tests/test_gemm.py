"""The CPU kernels: megatron_dsv3.model.gemm (fp32 products on oneDNN or torch's BLAS) against float64
references, the rule that picks between them, the grouped experts against Megatron-Core's
SequentialMLP, and the fp32 RMSNorm autograd function against its composite form."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_dsv3.model import gemm

#: fp32 products of length <= 512 land within ~1e-6 of the float64 result (relative to the largest
#: entry) whichever library sums them; a lost fp32 bit pattern (a tf32/bf16 product) is ~1e-3
FP32_REL = 3e-6


class _Ops(TorchDispatchMode):
    """The operators a call dispatches."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def _linear_case(x_shape, n, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*x_shape, generator=g).requires_grad_()
    w = (torch.randn(n, x_shape[-1], generator=g) / x_shape[-1] ** 0.5).requires_grad_()
    b = torch.randn(n, generator=g).requires_grad_() if bias else None
    dy = torch.randn(*x_shape[:-1], n, generator=g)
    return x, w, b, dy


def _float64_linear(x, w, b, dy):
    x64, w64 = x.detach().double(), w.detach().double()
    dy64 = dy.double().reshape(-1, dy.shape[-1])
    y = F.linear(x64, w64, None if b is None else b.detach().double())
    gx = (dy64 @ w64).reshape(x.shape)
    gw = dy64.t() @ x64.reshape(-1, x.shape[-1])
    return y, gx, gw, dy64.sum(0)


@pytest.mark.parametrize("mode", ["onednn", "auto", "blas"])
@pytest.mark.parametrize("x_shape,n,bias", [((512, 64), 767, False), ((96, 4, 96), 64, True),
                                            ((128, 512), 512, False), ((8, 16), 24, True)],
                         ids=["head", "3d_bias", "square", "small"])
def test_linear_matches_float64(set_gemm_mode, mode, x_shape, n, bias):
    set_gemm_mode(mode)
    x, w, b, dy = _linear_case(x_shape, n, bias)
    with _Ops() as ops:
        y = gemm.linear(x, w, b)
        y.backward(dy)
    want = _float64_linear(x, w, b, dy)
    got = (y, x.grad, w.grad) + ((b.grad,) if bias else ())
    for name, a, ref in zip(("y", "dx", "dw", "db"), got, want):
        assert a.dtype == torch.float32 and a.shape == ref.shape, name
        assert _rel(a, ref) < FP32_REL, (name, _rel(a, ref))
    macs = x.numel() // x_shape[-1] * x_shape[-1] * n
    on_onednn = mode == "onednn" or (mode == "auto" and macs >= gemm.MIN_MACS)
    assert ("mkldnn._linear_pointwise" in ops.names) == on_onednn, ops.names
    if mode == "blas":                                     # exactly torch's F.linear
        x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        b2 = b.detach().clone().requires_grad_() if bias else None
        F.linear(x2, w2, b2).backward(dy)
        assert torch.equal(F.linear(x2, w2, b2), y) and torch.equal(x2.grad, x.grad) and torch.equal(w2.grad, w.grad)


def test_linear_output_is_not_a_custom_function_view(set_gemm_mode):
    """Megatron's vocab-parallel cross entropy edits the logits in place: the 3-D output must allow it."""
    set_gemm_mode("onednn")
    x, w, _, _ = _linear_case((6, 2, 32), 40, False)
    y = gemm.linear(x, w)
    y.sub_(1.0)                                            # raises if y were a view made inside a Function
    y.sum().backward()
    assert torch.allclose(x.grad, w.detach().sum(0).expand_as(x), atol=1e-5)


def test_inference_and_transposed_inputs(set_gemm_mode):
    set_gemm_mode("onednn")
    g = torch.Generator().manual_seed(1)
    base = torch.randn(96, 200, generator=g)
    x = base[:, 10:138]                                    # strided rows
    w = torch.randn(128, 64, generator=g).t()              # a transposed view [64, 128]
    with torch.no_grad():
        y = gemm.linear(x, w)
    assert _rel(y, x.double() @ w.double().t()) < FP32_REL


@pytest.mark.parametrize("mode", ["onednn", "auto", "blas"])
def test_grouped_linear_matches_float64(set_gemm_mode, mode):
    set_gemm_mode(mode)
    g = torch.Generator().manual_seed(2)
    counts, k, n = [37, 0, 300, 5, 170], 256, 96
    x = torch.randn(sum(counts), k, generator=g).requires_grad_()
    ws = [(torch.randn(n, k, generator=g) / k ** 0.5).requires_grad_() for _ in counts]
    dy = torch.randn(sum(counts), n, generator=g)
    y = gemm.grouped_linear(x, counts, ws)
    y.backward(dy)
    x64, dy64 = x.detach().double(), dy.double()
    row = 0
    for c, w in zip(counts, ws):
        xe, de, w64 = x64[row:row + c], dy64[row:row + c], w.detach().double()
        if c:
            assert _rel(y[row:row + c], xe @ w64.t()) < FP32_REL
            assert _rel(x.grad[row:row + c], de @ w64) < FP32_REL
            assert _rel(w.grad, de.t() @ xe) < FP32_REL
        else:
            assert torch.equal(w.grad, torch.zeros_like(w))
        row += c


def test_grouped_linear_refuses_mismatched_counts():
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match="row counts"):
        gemm.grouped_linear(x, [3, 3], [torch.randn(2, 4), torch.randn(2, 4)])


def test_mode_is_checked(set_gemm_mode, monkeypatch):
    with pytest.raises(ValueError, match="MEGATRON_DSV3_CPU_GEMM='fast'.*auto, onednn, blas"):
        gemm.set_mode("fast")
    monkeypatch.setenv("MEGATRON_DSV3_CPU_GEMM", "blas")
    monkeypatch.setitem(gemm._state, "mode", None)         # read the environment again
    assert gemm.mode() == "blas"
    monkeypatch.setattr(gemm, "onednn_available", lambda: False)   # a torch built without oneDNN
    with pytest.raises(RuntimeError, match="no oneDNN.*MEGATRON_DSV3_CPU_GEMM=blas"):
        gemm.set_mode("onednn")
    gemm.set_mode("auto")
    assert gemm.mode() == "blas" and "auto, but this torch build has no oneDNN" in gemm._state["why"]


@pytest.mark.parametrize("mode", ["blas", "onednn"])
def test_grouped_experts_match_sequential_mlp(cpu_world, set_gemm_mode, mode):
    """Our GroupedExperts vs Megatron-Core's SequentialMLP with the same weights and routing: bit for
    bit on torch's BLAS, within fp32 rounding on oneDNN."""
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.moe.experts import SequentialMLP

    from megatron_dsv3.config import DSv3Config, cpu_overrides
    from megatron_dsv3.model.experts import GroupedExperts

    set_gemm_mode(mode)
    model_parallel_cuda_manual_seed(7)
    cfg = DSv3Config.from_preset("tiny", **cpu_overrides(), hidden_size=128, moe_intermediate_size=96)
    sub = LocalSpecProvider().grouped_mlp_modules(False).keywords["submodules"]
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    ours = GroupedExperts(4, cfg, submodules=sub, pg_collection=pgs)
    theirs = SequentialMLP(4, cfg, submodules=sub, pg_collection=pgs)
    theirs.load_state_dict(ours.state_dict())
    assert ours._grouped(torch.zeros(1))
    g = torch.Generator().manual_seed(3)
    counts = torch.tensor([50, 0, 200, 30])
    x = torch.randn(int(counts.sum()), cfg.hidden_size, generator=g)
    probs = torch.rand(int(counts.sum()), generator=g)
    dy = torch.randn(int(counts.sum()), cfg.hidden_size, generator=g)
    res = {}
    for name, mod in (("ours", ours), ("theirs", theirs)):
        xi = x.clone().requires_grad_()
        out, _ = mod(xi, counts, probs)
        out.backward(dy)
        res[name] = [out, xi.grad] + [p.grad for p in mod.parameters()]
    for a, b in zip(res["ours"], res["theirs"]):
        if mode == "blas":
            assert torch.equal(a, b)
        elif not b.any():                                   # the expert without tokens: zero gradients
            assert not a.any()
        else:
            assert ((a - b).abs().max() / b.abs().max()).item() < FP32_REL


def test_expanded_gradient_is_made_dense(set_gemm_mode):
    """An incoming gradient of stride 0 (from ``out.sum().backward()``) would take oneDNN's reference
    kernel (~1000x slower): the operands are made dense first, with the same result."""
    set_gemm_mode("onednn")
    assert gemm._dense(torch.ones(1).expand(64, 32)).is_contiguous()
    t = torch.randn(8, 6)
    assert gemm._dense(t.t()) is not None and gemm._dense(t.t()).data_ptr() == t.data_ptr()   # no copy
    x, w, _, _ = _linear_case((256, 128), 96, False)
    gemm.linear(x, w).sum().backward()
    assert _rel(w.grad, x.detach().double().sum(0).expand(96, 128)) < FP32_REL


@pytest.mark.parametrize("shape", [(7, 3, 64), (16, 512)])
def test_rmsnorm_function(shape):
    """fp32: forward bit for bit with the composite maths, gradients within fp32 rounding of float64;
    other dtypes keep the composite (bf16 casts back before the gain, as DeepSeek-V3 does)."""
    from types import SimpleNamespace

    from megatron_dsv3.model.norm import RMSNorm

    g = torch.Generator().manual_seed(5)
    norm = RMSNorm(SimpleNamespace(params_dtype=torch.float32, sequence_parallel=False), shape[-1], eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=g))
    x = torch.randn(*shape, generator=g).requires_grad_()
    dy = torch.randn(*shape, generator=g)
    y = norm(x)
    assert type(y.grad_fn).__name__ == "_RMSNormFp32Backward"
    y.backward(dy)
    with torch.no_grad():
        composite = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    assert torch.equal(y, composite)
    x64, w64 = x.detach().double().requires_grad_(), norm.weight.detach().double().requires_grad_()
    ref = w64 * (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6))
    gx, gw = torch.autograd.grad(ref, (x64, w64), dy.double())
    assert _rel(x.grad, gx) < FP32_REL and _rel(norm.weight.grad, gw) < FP32_REL
    bf = RMSNorm(SimpleNamespace(params_dtype=torch.bfloat16, sequence_parallel=False), shape[-1])
    assert type(bf(x.detach().bfloat16().requires_grad_()).grad_fn).__name__ != "_RMSNormFp32Backward"


def test_cross_entropy_matches_megatrons(cpu_world):
    """DSv3GPTModel's loss at TP 1 (F.cross_entropy) = GPTModel's vocab-parallel cross entropy within
    fp32 rounding, loss and logits gradient, [b, s] out; a fusion flag keeps Megatron's."""
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_dsv3.config import DSv3Config, cpu_overrides
    from megatron_dsv3.model.spec import DSv3GPTModel, build_model

    model_parallel_cuda_manual_seed(3)
    model = build_model(DSv3Config.from_preset("tiny", **cpu_overrides(), num_layers=2))
    assert type(model) is DSv3GPTModel
    g = torch.Generator().manual_seed(4)
    s, b, v = 9, 3, model.vocab_size
    logits = torch.randn(s, b, v, generator=g) * 3
    labels = torch.randint(0, v, (b, s), generator=g)
    dl = torch.randn(b, s, generator=g)
    out = {}
    for name, fn in (("ours", model.compute_language_model_loss),
                     ("megatron", lambda lab, lg: GPTModel.compute_language_model_loss(model, lab, lg))):
        x = logits.clone().requires_grad_()
        with _Ops() as ops:
            loss = fn(labels, x)
        loss.backward(dl)
        out[name] = (loss, x.grad, ops.names)
    assert out["ours"][0].shape == (b, s)
    assert _rel(out["ours"][0], out["megatron"][0].double()) < FP32_REL
    assert _rel(out["ours"][1], out["megatron"][1].double()) < FP32_REL
    assert "aten.nll_loss_forward" in out["ours"][2] and "aten.nll_loss_forward" not in out["megatron"][2]
    model.config.cross_entropy_loss_fusion = True            # asked for: Megatron's fused cross entropy
    try:
        with _Ops() as ops:
            fused = model.compute_language_model_loss(labels, logits.clone())
    finally:
        model.config.cross_entropy_loss_fusion = False
    assert "aten.nll_loss_forward" not in ops.names
    assert _rel(fused, out["megatron"][0].double()) < FP32_REL
