"""Our fp32 model vs HF transformers' DeepseekV3 on small random checkpoints, HF round trip, FP8
dequantisation and checkpoint errors (single process)."""
from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_reference import VARIANTS, load_reference, make_checkpoint, quantize_fp8, read_state, routing_without, write_checkpoint


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, cpu_world):
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for i, variant in enumerate(VARIANTS):
        path = str(root / variant)
        cfg = make_checkpoint(path, variant, seed=10 + i)
        out[variant] = (path, cfg)
    return out


IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(params=["auto", "onednn"])
def gemm_mode(request, set_gemm_mode):
    """The CPU products as the rule picks them (torch's BLAS at these sizes), and all on oneDNN."""
    set_gemm_mode(request.param)
    return request.param


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_and_mtp_match_transformers(checkpoints, variant, gemm_mode):
    from megatron_dsv3 import hf

    path, cfg = checkpoints[variant]
    main, mtp_ref = load_reference(path)
    model = hf.load(path)
    assert (model.config.q_lora_rank is None) == (cfg["q_lora_rank"] is None)
    assert model.config.rope_scaling["factor"] == 4.0 and model.config.n_group == 4
    ref = main(IDS).logits
    ours = hf.logits(model, IDS)
    assert ours.shape == (2, 12, 128)
    assert (ours - ref).abs().max().item() <= 1e-4
    mtp = hf.mtp_logits(model, IDS)
    assert len(mtp) == 1 and mtp[0].shape == (2, 11, 128)
    assert (mtp[0] - mtp_ref(main, IDS)).abs().max().item() <= 1e-4
    # The inputs really exercise the bias and the group limit in the first MoE layer.
    with_all, no_bias = routing_without(cfg, main, IDS, 1, bias=False, groups=True)
    assert (with_all != no_bias).any(), "the random bias must change the selection"
    with_all, no_groups = routing_without(cfg, main, IDS, 1, bias=True, groups=False)
    assert (with_all != no_groups).any(), "the group limit must change the selection"


def test_reload_another_checkpoint_in_same_process(checkpoints):
    from megatron_dsv3 import hf

    a = hf.logits(hf.load(checkpoints["base"][0]), IDS)
    b = hf.logits(hf.load(checkpoints["no_q_lora"][0]), IDS)
    again = hf.logits(hf.load(checkpoints["base"][0]), IDS)
    assert not torch.allclose(a, b)
    assert torch.equal(a, again)


def test_round_trip_is_exact(checkpoints, tmp_path):
    from megatron_dsv3 import hf

    path, cfg = checkpoints["base"]
    model = hf.load(path)
    hf.save(model, str(tmp_path / "out"), dtype=torch.float32)
    original, saved = read_state(path), load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(original) == set(saved)
    for k, v in original.items():
        assert torch.equal(v.float(), saved[k].float()), k
    with open(tmp_path / "out" / "config.json") as f:
        written = json.load(f)
    for key in ("num_hidden_layers", "q_lora_rank", "kv_lora_rank", "n_group", "topk_group",
                "first_k_dense_replace", "rope_scaling", "num_nextn_predict_layers", "routed_scaling_factor"):
        assert written[key] == cfg[key], key
    # and the saved checkpoint loads back to the same logits
    assert torch.equal(hf.logits(hf.load(str(tmp_path / "out")), IDS), hf.logits(model, IDS))


def test_fp8_checkpoint_is_dequantised(checkpoints, tmp_path):
    from megatron_dsv3 import hf

    path, cfg = checkpoints["base"]
    state = read_state(path)
    quantised = dict(state)
    targets = [k for k in state if k.endswith(("q_b_proj.weight", "kv_b_proj.weight", "o_proj.weight"))
               or ".experts." in k]
    for k in targets:
        q, s = quantize_fp8(state[k].float(), block=128)
        quantised[k] = q
        quantised[k[: -len("weight")] + "weight_scale_inv"] = s
    write_checkpoint(str(tmp_path / "fp8"), cfg, quantised)
    model = hf.load(str(tmp_path / "fp8"))
    sd = hf.to_hf_state_dict(model)
    for k in targets:
        q, s = quantised[k], quantised[k[: -len("weight")] + "weight_scale_inv"]
        expected = torch.empty_like(q, dtype=torch.float32)
        for i in range(s.shape[0]):          # independent block loop
            for j in range(s.shape[1]):
                blk = (slice(i * 128, (i + 1) * 128), slice(j * 128, (j + 1) * 128))
                expected[blk] = q[blk].float() * s[i, j]
        assert torch.equal(sd[k], expected), k
        assert not torch.equal(sd[k], state[k].float()), f"{k}: FP8 should be lossy"


def _broken_copy(src, dst, edit):
    shutil.copytree(src, dst)
    files = [f for f in os.listdir(dst) if f.endswith(".safetensors")]
    for f in files:
        state = load_file(os.path.join(dst, f))
        if edit(state):
            save_file(state, os.path.join(dst, f))
    return dst


def test_missing_tensor_is_named(checkpoints, tmp_path):
    from megatron_dsv3 import hf

    name = "model.layers.1.self_attn.kv_b_proj.weight"
    path = _broken_copy(checkpoints["no_q_lora"][0], tmp_path / "m", lambda s: s.pop(name, None) is not None)
    with pytest.raises(hf.HFCheckpointError, match="kv_b_proj"):
        hf.load(str(path))


def test_wrong_shape_is_named(checkpoints, tmp_path):
    from megatron_dsv3 import hf

    name = "model.layers.2.mlp.experts.3.down_proj.weight"

    def edit(s):
        if name in s:
            s[name] = torch.zeros(64, 31)
            return True
        return False

    path = _broken_copy(checkpoints["no_q_lora"][0], tmp_path / "s", edit)
    with pytest.raises(hf.HFCheckpointError, match=r"experts\.3\.down_proj"):
        hf.load(str(path))


def test_config_that_does_not_match_weights(checkpoints, tmp_path):
    from megatron_dsv3 import hf

    path = shutil.copytree(checkpoints["no_q_lora"][0], tmp_path / "c")
    with open(path / "config.json") as f:
        cfg = json.load(f)
    cfg["num_hidden_layers"] = 2          # the checkpoint has 3 layers + MTP
    with open(path / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(hf.HFCheckpointError, match="model.layers"):
        hf.load(str(path))
    cfg["num_hidden_layers"], cfg["kv_lora_rank"] = 3, 12
    with open(path / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(hf.HFCheckpointError, match="kv_a_proj_with_mqa|kv_b_proj|kv_a_layernorm"):
        hf.load(str(path))


# ------------------------------------------------------------------------------------------------
# Issue 8: each HF tensor checked on its own before sharding; damaged files named; NaN warned about
# ------------------------------------------------------------------------------------------------
def _set(name, fn):
    def edit(s):
        if name in s:
            s[name] = fn(s[name]).contiguous()
            return True
        return False
    return edit


def _edits(*edits):
    return lambda s: any([e(s) for e in edits])


def test_gate_and_up_proj_are_checked_one_by_one(checkpoints, tmp_path):
    """A wrong up_proj was reported as gate_proj with the concatenated shape; 31 + 33 rows loaded."""
    from megatron_dsv3 import hf

    src = checkpoints["no_q_lora"][0]
    up = "model.layers.0.mlp.up_proj.weight"                      # dense layer: intermediate 96
    path = _broken_copy(src, tmp_path / "up", _set(up, lambda t: t[:-1]))
    with pytest.raises(hf.HFCheckpointError) as e:
        hf.load(str(path))
    assert str(e.value).startswith(f"{up}: shape (95, 64), but config.json makes it (96, 64)")
    gate, up = (f"model.layers.1.mlp.shared_experts.{p}_proj.weight" for p in ("gate", "up"))  # 32 rows each
    path = _broken_copy(src, tmp_path / "31_33", _edits(_set(gate, lambda t: t[:-1]),
                                                        _set(up, lambda t: torch.cat([t, t[:1]]))))
    with pytest.raises(hf.HFCheckpointError, match=rf"^{re.escape(gate)}: shape \(31, 64\).*\(32, 64\)"):
        hf.load(str(path))


def test_transposed_tensor_is_named(checkpoints, tmp_path):
    from megatron_dsv3 import hf

    name = "model.layers.2.mlp.experts.5.down_proj.weight"           # (64, 32) stored as (32, 64)
    path = _broken_copy(checkpoints["no_q_lora"][0], tmp_path / "t", _set(name, lambda t: t.t()))
    with pytest.raises(hf.HFCheckpointError, match=rf"^{re.escape(name)}: shape \(32, 64\).*stored transposed"):
        hf.load(str(path))


def test_damaged_files_are_named(checkpoints, tmp_path):
    from megatron_dsv3 import hf

    single = shutil.copytree(checkpoints["no_q_lora"][0], tmp_path / "trunc")
    f = single / "model.safetensors"
    with open(f, "r+b") as fh:                                      # was a bare SafetensorError
        fh.truncate(os.path.getsize(f) - 1000)
    with pytest.raises(hf.HFCheckpointError, match=rf"{re.escape(str(f))}: not a readable safetensors file"):
        hf.load(str(single))

    sharded = shutil.copytree(checkpoints["base"][0], tmp_path / "index")
    index = sharded / "model.safetensors.index.json"
    with open(index) as fh:
        data = json.load(fh)
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    wrong = next(s for s in set(data["weight_map"].values()) if s != data["weight_map"][name])
    data["weight_map"][name] = wrong                                # was "File does not contain tensor ..."
    index.write_text(json.dumps(data))
    with pytest.raises(hf.HFCheckpointError) as e:
        hf.load(str(sharded))
    assert str(index) in str(e.value) and wrong in str(e.value) and name in str(e.value)
    index.write_text('{"weight_map": ')
    with pytest.raises(hf.HFCheckpointError, match=rf"{re.escape(str(index))} is not a safetensors index"):
        hf.load(str(sharded))


def test_non_finite_weights_load_with_a_warning(checkpoints, tmp_path):
    from megatron_dsv3 import hf
    from megatron_dsv3.checkpoint.hf_reader import NonFiniteWeightWarning

    nan, inf = "model.layers.1.self_attn.o_proj.weight", "model.norm.weight"
    path = _broken_copy(checkpoints["no_q_lora"][0], tmp_path / "n", _edits(
        _set(nan, lambda t: t.index_fill(0, torch.tensor([3]), float("nan"))),
        _set(inf, lambda t: t.index_fill(0, torch.tensor([0, 1]), float("inf")))))
    with pytest.warns(NonFiniteWeightWarning) as record:
        model = hf.load(str(path))
    messages = [str(w.message) for w in record if issubclass(w.category, NonFiniteWeightWarning)]
    assert any(f"{nan!r} holds 64 NaN and 0 Inf" in m for m in messages), messages
    assert any(f"{inf!r} holds 0 NaN and 2 Inf" in m for m in messages), messages
    params = dict(model.named_parameters())
    assert torch.isnan(params["decoder.layers.1.self_attention.linear_proj.weight"][3]).all()   # loaded as is
    assert torch.isinf(params["decoder.final_layernorm.weight"][:2]).all()


def test_te_grouped_expert_names_load_and_save(checkpoints, tmp_path):
    """Transformer Engine's grouped experts (TEGroupedMLP, --moe-grouped-gemm) hold expert e's weights as
    ``experts.linear_fc1.weight{e}`` (TE's GroupedLinear) instead of ``experts.local_experts.{e}.
    linear_fc1.weight``. TE is not installable here, so the experts of a loaded model are replaced by
    a module with exactly those parameter names: the HF export from it equals the checkpoint, and a
    HF import into it fills every grouped weight with the same tensor as the per-expert model's."""
    from megatron_dsv3 import hf
    from megatron_dsv3.checkpoint import hf_reader, hf_writer
    from megatron_dsv3.checkpoint.hf_keys import grouped_expert_name

    assert grouped_expert_name("decoder.layers.2.mlp.experts.local_experts.7.linear_fc2.weight") == \
        "decoder.layers.2.mlp.experts.linear_fc2.weight7"

    class GroupedLinear(torch.nn.Module):           # TE's GroupedLinear parameter names
        def __init__(self, weights):
            super().__init__()
            for i, w in enumerate(weights):
                self.register_parameter(f"weight{i}", torch.nn.Parameter(w.detach().clone()))

    class Grouped(torch.nn.Module):                 # TEGroupedMLP's submodule names
        def __init__(self, experts):
            super().__init__()
            self.linear_fc1 = GroupedLinear([e.linear_fc1.weight for e in experts.local_experts])
            self.linear_fc2 = GroupedLinear([e.linear_fc2.weight for e in experts.local_experts])

    path, _ = checkpoints["base"]
    per_expert = hf.load(path)
    grouped = hf.load(path)
    swapped = 0
    for module in grouped.modules():
        if hasattr(module, "experts") and hasattr(module.experts, "local_experts"):
            module.experts = Grouped(module.experts)
            swapped += 1
    assert swapped >= 2
    names = dict(grouped.named_parameters())
    assert any(".experts.linear_fc1.weight0" in n for n in names)
    assert not any("local_experts" in n for n in names)
    saved = hf_writer.to_hf_state_dict(grouped)
    original = read_state(path)
    assert set(saved) >= {k for k in original if ".experts." in k}
    for k, v in original.items():
        if k in saved:
            assert torch.equal(v.float(), saved[k].float()), k
    with torch.no_grad():
        for p in grouped.parameters():
            p.zero_()
    hf_reader.load_into(grouped, path)
    reference = dict(per_expert.named_parameters())
    for n, p in grouped.named_parameters():
        ours = n
        match = re.search(r"experts\.(linear_fc[12])\.weight(\d+)$", n)
        if match:
            ours = n[:match.start()] + f"experts.local_experts.{match.group(2)}.{match.group(1)}.weight"
        assert torch.equal(p, reference[ours]), n
