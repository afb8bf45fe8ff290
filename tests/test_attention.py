"""Document masking (--reset-attention-mask / --reset-position-ids), attention dropout and selective
recomputation (--recompute-modules) in our MLA, each against an independent reference:

- packed documents with Megatron's document mask give each document's logits (and MTP logits) of
  that document run alone (world 1, and TP2 + sequence parallel);
- attention dropout is softmax -> dropout -> @ v with the mask drawn from Megatron's model-parallel
  RNG stream; a run stopped and resumed equals the uninterrupted one;
- every recompute set gives the gradients of no recomputation (bit for bit, dropout on) and holds
  less activation memory for backward;
- the launcher trains with --reset-attention-mask on generated data, the mask reaches every pipeline
  stage (PP3 equals world 1), and refuses what is not implemented, naming the flag.
"""
from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attention_checks import (DOCS, RECOMPUTE_SETS, documents, grads_match, masked_logits, packed_batch,
                              reseed, same, tp2_body, train_step)
from distributed import run_world
from hf_reference import make_checkpoint
from launch import TINY, metrics, run_ok

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

import bench_recompute  # noqa: E402


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, cpu_world):
    root = tmp_path_factory.mktemp("attn")
    out = {}
    for variant in ("base", "no_q_lora"):
        make_checkpoint(str(root / variant), variant, seed=21)
        out[variant] = str(root / variant)
    return out


# ------------------------------------------------------------------------------------------------
# Document masking
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["base", "no_q_lora"])
def test_packed_documents_equal_documents_run_alone(checkpoints, variant):
    """Each document of a packed sequence, with the mask GPTDataset builds, gets the logits and MTP
    logits of that document run alone at positions 0..len-1 (the reference: our model, no mask)."""
    from megatron_dsv3 import hf

    model = hf.load(checkpoints[variant])
    ids, mask, reset_pos = packed_batch()
    main, mtp = masked_logits(model, ids, mask)
    unmasked, _ = masked_logits(model, ids, None)
    worst_main = worst_mtp = 0.0
    for row in range(len(DOCS)):
        for k, (start, n) in enumerate(documents(row)):
            doc = ids[row:row + 1, start:start + n]
            alone = hf.logits(model, doc)[0]
            worst_main = max(worst_main, (main[row, start:start + n] - alone).abs().max().item())
            # MTP entry i predicts token i+2 from h_i and token i+1: the last entry of a document
            # reads the next document's first token, and alone it has no input there.
            alone_mtp = hf.mtp_logits(model, doc)[0][0]
            worst_mtp = max(worst_mtp, (mtp[row, start:start + n - 1] - alone_mtp).abs().max().item())
            if k > 0:   # without the mask a later document attends to the earlier ones
                assert (unmasked[row, start:start + n] - alone).abs().max().item() > 1e-3
    assert worst_main <= 1e-5 and worst_mtp <= 1e-5, (worst_main, worst_mtp)
    # Positions reset per document (--reset-position-ids) give the same floats: RoPE is applied by
    # position in the sequence and is relative, so positions never reach the attention scores.
    again, again_mtp = masked_logits(model, ids, mask, positions=reset_pos)
    assert torch.equal(again, main) and torch.equal(again_mtp, mtp)


def test_a_malformed_mask_is_refused(checkpoints):
    from megatron_dsv3 import hf

    model = hf.load(checkpoints["base"])
    ids, mask, _ = packed_batch()
    with pytest.raises(ValueError, match="True = masked"):
        masked_logits(model, ids, (~mask).float())
    with pytest.raises(ValueError, match=r"\[batch or 1, 1, 24, 24\]"):
        masked_logits(model, ids, mask[:, :, :12])


# ------------------------------------------------------------------------------------------------
# The attention kernel (model/mla.py attention_kernel)
# ------------------------------------------------------------------------------------------------
def test_attention_kernel_rule():
    """The measured rule: padded V (CPU flash) for small q/k heads or long sequences, our written-out
    kernel for large heads below 768 tokens; neither with dropout, never off CPU, never when the head
    sizes are equal."""
    from megatron_dsv3.model.mla import attention_kernel

    assert attention_kernel("cpu", 24, 16, 128, 0.0) == "sdpa_padded_v"
    assert attention_kernel("cpu", 96, 64, 256, 0.0) == "explicit"
    assert attention_kernel("cpu", 96, 64, 4096, 0.0) == "sdpa_padded_v"
    assert attention_kernel("cpu", 192, 128, 512, 0.0) == "explicit"
    assert attention_kernel("cpu", 192, 128, 768, 0.0) == "sdpa_padded_v"
    assert attention_kernel("cpu", 192, 128, 256, 0.1) == "sdpa"
    assert attention_kernel("cpu", 24, 24, 4096, 0.0) == "sdpa"
    assert attention_kernel("cuda", 192, 128, 256, 0.0) == "sdpa"


@pytest.mark.parametrize("masked", [False, True], ids=["causal", "mask"])
def test_explicit_kernel_gradients_in_float64(masked):
    """The written-out backward (model/mla.py _ExplicitAttention) against autograd's numerical
    gradients in float64, with q/k/v as the permuted views MLA passes; and its output against
    softmax(q k^T * scale + mask) v written with plain torch ops."""
    from megatron_dsv3.model.mla import _ExplicitAttention

    torch.manual_seed(0)
    s, b, H, dq, dv = 6, 2, 3, 5, 4
    q, k = (torch.randn(s, b, H, dq, dtype=torch.float64).permute(1, 2, 0, 3).requires_grad_() for _ in range(2))
    v = torch.randn(s, b, H, dv, dtype=torch.float64).permute(1, 2, 0, 3).requires_grad_()
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), 1)
    if masked:     # two documents per row, the second starting at a different place in each sequence
        mask = causal.repeat(b, 1, 1, 1)
        mask[0, :, 3:, :3] = True
        mask[1, :, 2:, :2] = True
        bias = None
    else:
        mask, bias = None, torch.zeros(s, s, dtype=torch.float64).masked_fill(causal, float("-inf"))
    fn = lambda q_, k_, v_: _ExplicitAttention.apply(q_, k_, v_, 0.37, bias, mask)
    assert torch.autograd.gradcheck(fn, (q, k, v))
    scores = (q @ k.transpose(-1, -2)) * 0.37
    reference = scores.masked_fill(causal if mask is None else mask, float("-inf")).softmax(-1) @ v
    assert torch.allclose(fn(q, k, v), reference, rtol=0, atol=1e-14)


@pytest.mark.parametrize("kernel", ["sdpa_padded_v", "explicit"])
@pytest.mark.parametrize("masked", [False, True], ids=["causal", "document_mask"])
def test_cpu_kernels_equal_the_math_kernel(checkpoints, monkeypatch, masked, kernel):
    """Logits and every parameter's gradient with V padded (flash kernel) or with our written-out kernel
    equal those of SDPA's unpadded math kernel within fp32 rounding, causal and with the document mask
    (measured: padded 6.9e-7 of the largest logit, 1.8e-6 of each gradient's largest entry)."""
    from megatron_dsv3 import hf
    from megatron_dsv3.model import mla

    model = hf.load(checkpoints["base"])
    ids, mask, _ = packed_batch()
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    results = {}
    for run in ("sdpa", kernel):
        monkeypatch.setattr(mla, "attention_kernel", lambda *a, k=run: k)
        model.zero_grad(set_to_none=True)
        model.train()
        logits = gather_vocab_logits(model, ids, pos, mask if masked else None)
        logits.float().square().mean().backward()
        results[run] = (logits.detach().clone(),
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (a, ga), (b, gb) = results["sdpa"], results[kernel]
    assert not torch.equal(a, b)                     # two kernels really ran
    assert (a - b).abs().max() <= 1e-5 * a.abs().max(), (a - b).abs().max()
    assert ga.keys() == gb.keys() and len(ga) > 20
    for n in ga:
        scale = ga[n].abs().max().clamp_min(1e-12)
        assert (ga[n] - gb[n]).abs().max() <= 2e-5 * scale, (n, (ga[n] - gb[n]).abs().max(), scale)


def gather_vocab_logits(model, ids, pos, mask):
    from attention_checks import gather_vocab

    return gather_vocab(model(ids, pos, mask))


def test_tp2_sequence_parallel_documents_and_recompute(checkpoints, tmp_path):
    """TP2 + SP on 2 ranks: packed documents give the world-1 per-document logits; recomputing
    everything with attention and hidden dropout on gives the gradients of no recomputation."""
    from megatron_dsv3 import hf

    model = hf.load(checkpoints["base"])
    ids, mask, _ = packed_batch()
    main, mtp = masked_logits(model, ids, mask)
    ref = {"ids": ids, "mask": mask, "logits": main, "mtp": mtp}
    torch.save(ref, tmp_path / "ref.pt")
    run_world(2, tp2_body, checkpoints["base"], str(tmp_path / "ref.pt"), str(tmp_path / "out.json"))
    reports = json.loads((tmp_path / "out.json").read_text())
    print(json.dumps(reports, indent=1))
    for r in reports:
        assert r["logits"] <= 1e-5 and r["mtp"] <= 1e-5, r
        assert r["recompute_loss_equal"] and r["recompute_grads_equal"] and r["recompute_counts_equal"], r
        assert r["dropout_changes_loss"], r


# ------------------------------------------------------------------------------------------------
# Attention dropout
# ------------------------------------------------------------------------------------------------
def test_attention_dropout_is_softmax_dropout_on_the_model_parallel_stream(checkpoints):
    """The attention core at p > 0 equals softmax(q k^T * scale, mask) -> dropout -> @ v with the
    dropout drawn from Megatron's model-parallel RNG stream (the default stream is not touched); at
    p = 0, or in eval mode, no dropout."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from megatron_dsv3 import hf

    model = hf.load(checkpoints["base"], attention_dropout=0.3)
    attn = model.decoder.layers[0].self_attention
    _, mask, _ = packed_batch()
    g = torch.Generator().manual_seed(4)
    s, b, h, dq, dv = 24, 2, attn.n_local_heads, attn.dn + attn.dr, attn.dv
    q, k = torch.randn(s, b, h, dq, generator=g), torch.randn(s, b, h, dq, generator=g)
    v = torch.randn(s, b, h, dv, generator=g)

    def reference(p):
        scores = torch.einsum("qbhd,kbhd->bhqk", q, k) * attn.softmax_scale
        probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
        with get_cuda_rng_tracker().fork():
            probs = F.dropout(probs, p)
        return torch.einsum("bhqk,kbhd->qbhd", probs, v).reshape(s, b, h * dv)

    attn.train()
    reseed()      # (a new tracker object)
    default_before = torch.get_rng_state()
    stream_before = get_cuda_rng_tracker().get_states()["model-parallel-rng"]
    ours = attn._core_attention(q, k, v, mask)
    assert torch.equal(torch.get_rng_state(), default_before), "dropout drew from the default stream"
    assert not torch.equal(get_cuda_rng_tracker().get_states()["model-parallel-rng"], stream_before)
    reseed()
    want = reference(0.3)
    assert (ours - want).abs().max().item() <= 1e-5
    assert (ours - reference(0.0)).abs().max().item() > 1e-2, "p = 0.3 must change the output"
    attn.eval()
    assert (attn._core_attention(q, k, v, mask) - reference(0.0)).abs().max().item() <= 1e-5


# ------------------------------------------------------------------------------------------------
# Selective recomputation
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("modules", RECOMPUTE_SETS, ids=["+".join(m) for m in RECOMPUTE_SETS])
@pytest.mark.parametrize("variant", ["base", "no_q_lora"])
def test_recompute_gives_identical_gradients_and_saves_memory(checkpoints, variant, modules):
    """Bit-identical loss and expert-bias token counts, and gradients (bit-identical; within fp32
    rounding with core_attn, see grads_match) with attention and hidden dropout on and a document
    mask; less activation memory held for backward than without."""
    from megatron_dsv3 import hf

    ids, mask, _ = packed_batch()
    labels = torch.roll(ids, -1, dims=1)
    drop = dict(attention_dropout=0.1, hidden_dropout=0.1)
    base_model = hf.load(checkpoints[variant], **drop)
    model = hf.load(checkpoints[variant], **drop, recompute_granularity="selective", recompute_modules=modules)
    base, got = train_step(base_model, ids, labels, mask), train_step(model, ids, labels, mask)
    assert torch.equal(base[0], got[0])
    assert grads_match(modules, got[1], base[1]), [k for k in base[1] if not torch.equal(base[1][k], got[1][k])][:5]
    assert same(base[2], got[2]) and all(c.sum() > 0 for c in got[2].values())
    saved = {}
    for name, m in (("none", base_model), ("set", model)):
        m.zero_grad()
        saved[name] = bench_recompute.saved_bytes_and_backward(m, ids, labels, mask)
    assert saved["set"] < 0.98 * saved["none"], saved


def test_layernorm_recompute_of_the_latent_norms(checkpoints):
    """'layernorm' drops the outputs of MLA's q/kv latent RMSNorms and recomputes them: same gradients, less memory."""
    from megatron.core.transformer.spec_utils import build_module

    from megatron_dsv3 import hf
    from megatron_dsv3.model.spec import get_dsv3_layer_spec

    cfg = hf.load(checkpoints["base"]).config
    out = {}
    for modules in (None, ["layernorm"]):
        if modules:
            cfg.recompute_granularity, cfg.recompute_modules = "selective", modules
        torch.manual_seed(0)
        attn = build_module(get_dsv3_layer_spec(cfg, moe=False).submodules.self_attention, config=cfg,
                            layer_number=1)
        attn.train()
        assert attn.recompute_latent_norms == bool(modules)
        x = torch.randn(24, 2, cfg.hidden_size, generator=torch.Generator().manual_seed(1), requires_grad=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y, _ = attn(x)
        held = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved
                    if not isinstance(t, torch.nn.Parameter)}.values())
        saved.clear()
        y.square().sum().backward()
        out[bool(modules)] = (held, x.grad.clone(), {n: p.grad.clone() for n, p in attn.named_parameters()})
    cfg.recompute_granularity, cfg.recompute_modules = None, None
    assert torch.equal(out[False][1], out[True][1]) and same(out[False][2], out[True][2])
    assert out[True][0] < out[False][0], (out[True][0], out[False][0])


# ------------------------------------------------------------------------------------------------
# Launch checks
# ------------------------------------------------------------------------------------------------


def _prepare(*extra):
    from megatron_dsv3.training import launcher

    return launcher.prepare(list(TINY) + ["--train-iters", "2", *extra])


SELECTIVE = ["--recompute-granularity", "selective", "--recompute-modules"]


@pytest.mark.parametrize("extra, expected", [
    (["--reset-position-ids"], "--reset-position-ids without --reset-attention-mask"),
    (SELECTIVE + ["core_attn", "gdn_norm_out"], "--recompute-modules gdn_norm_out"),
    (SELECTIVE + ["attention"], "--recompute-modules attention"),
    (SELECTIVE + ["moe_act"], "--recompute-modules moe_act"),
    (["--recompute-modules", "core_attn"], "--recompute-granularity selective"),
    (["--attention-dropout", "1.5"], "--attention-dropout 1.5"),
])
def test_launch_refuses_what_is_not_implemented(no_process_groups, extra, expected):
    from megatron_dsv3.training.arguments import LaunchError

    with pytest.raises(LaunchError) as info:
        _prepare(*extra)
    assert expected in str(info.value.code)


@pytest.mark.parametrize("extra", [
    ["--reset-attention-mask", "--reset-position-ids", "--attention-dropout", "0.1"],
    SELECTIVE + ["mla_up_proj", "core_attn", "layernorm", "mlp", "moe", "shared_experts"],
    ["--recompute-activations"],
    ["--recompute-granularity", "selective", "--moe-layer-recompute"],
])
def test_launch_accepts_what_is_implemented(no_process_groups, extra):
    args = _prepare(*extra)
    assert args.reset_attention_mask == ("--reset-attention-mask" in extra)


# ------------------------------------------------------------------------------------------------
# The launcher: document masking through every pipeline stage, dropout resume
# ------------------------------------------------------------------------------------------------
def write_documents(prefix: str, n_docs: int = 600, eod: int = 254, seed: int = 0) -> str:
    """Short arithmetic-progression documents (3..20 tokens + EOD), several per 32-token sample."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(n_docs):
        n, a, d = rng.integers(3, 21), rng.integers(0, 200), rng.integers(1, 6)
        doc = np.concatenate([(a + d * np.arange(n)) % eod, [eod]]).astype(np.int64)
        builder.add_document(torch.from_numpy(doc), [len(doc)])
    builder.finalize(prefix + ".idx")
    return prefix


@pytest.fixture(scope="module")
def docs_run(tmp_path_factory):
    """World 1, --reset-attention-mask --reset-position-ids on generated data: 4 steps, saved at 2."""
    root = tmp_path_factory.mktemp("docs")
    data = write_documents(str(root / "docs_text_document"))
    base = [a for a in TINY if a != "--mock-data"] + ["--data-path", data, "--num-layers", "3",
                                                       "--train-iters", "4"]
    masked = base + ["--reset-attention-mask", "--reset-position-ids"]
    run_ok(1, masked + ["--save", str(root / "ckpt"), "--save-interval", "2",
                        "--metrics-jsonl", str(root / "a.jsonl")])
    ckpt = root / "from2"
    shutil.copytree(root / "ckpt" / "iter_0000002", ckpt / "iter_0000002")
    (ckpt / "latest_checkpointed_iteration.txt").write_text("2")
    return root, base, masked, ckpt, metrics(str(root / "a.jsonl"))


def test_document_masked_training_reaches_every_pipeline_stage(docs_run):
    """It trains; PP3 (a middle stage that reads no tokens) from the step-2 checkpoint gives world 1's
    step-3 loss; without the mask the step-3 loss differs (the mask reaches the model)."""
    root, base, masked, ckpt, a = docs_run
    assert sorted(a) == [1, 2, 3, 4] and a[4]["train/lm_loss"] < a[1]["train/lm_loss"]
    weights_only = ["--load", str(ckpt), "--no-load-optim", "--no-load-rng"]
    run_ok(3, masked + weights_only + ["--pipeline-model-parallel-size", "3",
                                       "--metrics-jsonl", str(root / "pp3.jsonl")])
    pp3 = metrics(str(root / "pp3.jsonl"))
    assert abs(pp3[3]["train/lm_loss"] - a[3]["train/lm_loss"]) <= 1e-5 * a[3]["train/lm_loss"], (pp3[3], a[3])
    run_ok(1, base + weights_only + ["--metrics-jsonl", str(root / "nomask.jsonl")])
    nomask = metrics(str(root / "nomask.jsonl"))
    assert abs(nomask[3]["train/lm_loss"] - a[3]["train/lm_loss"]) > 1e-4, (nomask[3], a[3])


def _stop_and_resume(root, args, name):
    """(uninterrupted 4-step metrics, metrics of the run resumed from its step-2 checkpoint)."""
    ckpt = root / f"{name}_ckpt"
    run_ok(1, args + ["--save", str(ckpt), "--save-interval", "2", "--metrics-jsonl", str(root / f"{name}_a.jsonl")])
    resume = root / f"{name}_from2"
    shutil.copytree(ckpt / "iter_0000002", resume / "iter_0000002")
    (resume / "latest_checkpointed_iteration.txt").write_text("2")
    run_ok(1, args + ["--load", str(resume), "--metrics-jsonl", str(root / f"{name}_b.jsonl")])
    return metrics(str(root / f"{name}_a.jsonl")), metrics(str(root / f"{name}_b.jsonl"))


def test_attention_and_hidden_dropout_resume_exactly(docs_run):
    """--attention-dropout 0.1 and --hidden-dropout 0.1 (with the document mask) change the loss from
    step 1, and a run stopped at step 2 and resumed gives the very floats of the uninterrupted run:
    the attention-dropout stream (Megatron's model-parallel RNG) is in the checkpoint, and Megatron's
    hidden dropout (outside sequence parallelism) draws from the 'CUDA' default generator, which on
    CPU is torch's default generator, which the data loaders no longer advance (the CPU backend
    gives them their own generator: patch data_loader_generator). Either one drawing from a stream
    the checkpoint does not restore breaks the equality; that each acts at all is checked in-process
    (test_attention_dropout_is_softmax_dropout_on_the_model_parallel_stream, test_tp2_...)."""
    root, _, masked, _, no_dropout = docs_run
    a, b = _stop_and_resume(root, masked + ["--attention-dropout", "0.1", "--hidden-dropout", "0.1"], "drop")
    assert a[1]["train/lm_loss"] != no_dropout[1]["train/lm_loss"]
    assert sorted(b) == [3, 4]
    for it in (3, 4):
        assert b[it]["train/lm_loss"] == a[it]["train/lm_loss"], (it, b[it], a[it])
        assert b[it]["train/grad_norm"] == a[it]["train/grad_norm"]
