"""Router maths against closed forms and brute force (fp64)."""
from __future__ import annotations

import itertools

import pytest

import torch

from megatron_dsv3.model.router import route, sequence_balance_loss


def brute_force_route(logits, bias, top_k, n_group, topk_group, scaling):
    """Enumerate group subsets and expert subsets explicitly (DeepSeek-V3 noaux_tc)."""
    T, E = logits.shape
    per = E // n_group
    s = torch.sigmoid(logits)
    c = s + bias
    out_idx, out_w = [], []
    for t in range(T):
        gscore = [sorted(c[t, g * per:(g + 1) * per].tolist())[-2:] for g in range(n_group)]
        gscore = [sum(x) for x in gscore]
        best_groups = max(itertools.combinations(range(n_group), topk_group),
                          key=lambda gs: sum(gscore[g] for g in gs))
        allowed = [e for g in best_groups for e in range(g * per, (g + 1) * per)]
        chosen = max(itertools.combinations(allowed, top_k), key=lambda es: sum(c[t, e].item() for e in es))
        w = torch.stack([s[t, e] for e in chosen])
        out_idx.append(sorted(chosen))
        w = w / w.sum() * scaling
        out_w.append(dict(zip(chosen, w.tolist())))
    return out_idx, out_w


def test_group_limited_routing_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 12, generator=g, dtype=torch.float64)
    bias = 0.3 * torch.randn(12, generator=g, dtype=torch.float64)
    scores, w, idx = route(logits, top_k=3, n_group=4, topk_group=2, scoring="sigmoid", bias=bias,
                           norm_topk_prob=True, scaling=2.5)
    ref_idx, ref_w = brute_force_route(logits, bias, 3, 4, 2, 2.5)
    for t in range(40):
        assert sorted(idx[t].tolist()) == ref_idx[t]
        for e, wt in zip(idx[t].tolist(), w[t].tolist()):
            assert abs(wt - ref_w[t][e]) < 1e-12
    assert torch.allclose(w.sum(-1), torch.full((40,), 2.5, dtype=torch.float64))
    # the bias only selects: weights come from unbiased sigmoid scores
    assert torch.allclose(scores, torch.sigmoid(logits))


def test_softmax_greedy_routing_is_plain_top_k():
    logits = torch.randn(16, 8, dtype=torch.float64)
    scores, w, idx = route(logits, top_k=2, n_group=1, topk_group=1, scoring="softmax", bias=None,
                           norm_topk_prob=False, scaling=1.0)
    p = torch.softmax(logits, -1)
    assert torch.equal(idx.sort(-1).values, p.topk(2, -1).indices.sort(-1).values)
    assert torch.allclose(w, p.gather(1, idx))


def test_sequence_balance_loss_closed_form():
    g = torch.Generator().manual_seed(1)
    s_len, b, E, K, alpha = 6, 3, 8, 2, 1e-4
    scores = torch.rand(s_len * b, E, generator=g, dtype=torch.float64)
    idx = scores.topk(K, -1).indices
    routing_map = torch.zeros_like(scores, dtype=torch.bool).scatter(1, idx, True)
    got = sequence_balance_loss(scores, routing_map, s_len, b, K, alpha)
    # explicit per-sequence formula: L = alpha * sum_e f_e P_e, averaged over sequences
    per_seq = []
    sc, rm = scores.view(s_len, b, E), routing_map.view(s_len, b, E)
    for j in range(b):
        f = [E / (K * s_len) * rm[:, j, e].sum().item() for e in range(E)]
        P = [sum((sc[t, j, e] / sc[t, j].sum()).item() for t in range(s_len)) / s_len for e in range(E)]
        per_seq.append(alpha * sum(fe * pe for fe, pe in zip(f, P)))
    assert abs(got.item() - sum(per_seq) / b) < 1e-15
    # perfectly balanced routing and uniform scores give alpha exactly
    uniform = torch.full((E, E), 1.0 / E, dtype=torch.float64)
    balanced = torch.eye(E, dtype=torch.bool).roll(1, 1) | torch.eye(E, dtype=torch.bool)
    assert abs(sequence_balance_loss(uniform, balanced, E, 1, 2, alpha).item() - alpha) < 1e-18


def test_cross_node_counts_against_a_loop():
    """The cross-node metric: assignments to experts on other nodes, and distinct other nodes per
    token, for random routings (brute force reference)."""
    import torch

    from megatron_dsv3.parallel.topology import cross_node_counts

    g = torch.Generator().manual_seed(0)
    for n_nodes, own in ((2, 0), (4, 3), (3, 1)):
        expert_node = torch.randint(0, n_nodes, (16,), generator=g)
        indices = torch.stack([torch.randperm(16, generator=g)[:4] for _ in range(50)])
        remote = sum(int(expert_node[e] != own) for row in indices for e in row)
        nodes = sum(len({int(expert_node[e]) for e in row} - {own}) for row in indices)
        routing_map = torch.zeros(50, 16, dtype=torch.bool).scatter(1, indices, True)
        got = cross_node_counts(routing_map, expert_node, own, n_nodes)
        assert got.tolist() == [remote, nodes, 50]


def test_balance_loss_logging_survives_models_of_different_depth(cpu_world):
    """Megatron's MoE metrics tracker is process-wide; building and training a deeper model after a
    shallower one in the same process must not index past the first model's entry."""
    import torch
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    from megatron_dsv3.config import DSv3Config, cpu_overrides
    from megatron_dsv3.spec import build_model

    for layers in (2, 5):
        cfg = DSv3Config.from_preset("tiny", num_layers=layers, mtp_num_layers=None, **cpu_overrides())
        model = build_model(cfg).train()
        ids = torch.randint(0, cfg.vocab_size, (2, 8))
        model(ids, torch.arange(8).expand(2, 8), None, labels=ids).sum().backward()
        assert get_moe_metrics_tracker().metrics["seq_load_balancing_loss"].values.numel() == layers


def test_bias_update_sign_rule_on_a_hand_computed_example(cpu_world):
    """DSv3's rule through the path training takes (our router's token counts -> Megatron-Core's
    finalize_model_grads bias update): an overloaded expert's bias goes DOWN by gamma, an underloaded
    one's UP, one at the mean load stays. Counts [5, 1, 3, 3, 0, 8, 2, 2] (mean 3), gamma 0.01."""
    import torch
    from megatron.core.distributed.finalize_model_grads import _update_router_expert_bias

    from megatron_dsv3.config import DSv3Config, cpu_overrides
    from megatron_dsv3.model.router import DSv3Router

    cfg = DSv3Config.from_preset("tiny", bias_update_rate=0.01, **cpu_overrides())
    router = DSv3Router(cfg).train()
    router.expert_bias.copy_(torch.tensor([0.5, 0.5, 0.5, 0.5, -0.25, 0.0, 0.125, 1.0]))
    router.local_tokens_per_expert.copy_(torch.tensor([5.0, 1.0, 3.0, 3.0, 0.0, 8.0, 2.0, 2.0]))
    _update_router_expert_bias([router], cfg)
    expected = [0.49, 0.51, 0.5, 0.5, -0.24, -0.01, 0.135, 1.01]
    assert router.expert_bias.tolist() == pytest.approx(expected, abs=1e-7)


def test_router_counts_feed_the_bias_update(cpu_world):
    """The counts the bias update reads are the tokens the router chose in training steps."""
    import torch

    from megatron_dsv3.config import DSv3Config, cpu_overrides
    from megatron_dsv3.model.router import DSv3Router

    cfg = DSv3Config.from_preset("tiny", **cpu_overrides())
    router = DSv3Router(cfg).train()
    x = torch.randn(6, 2, cfg.hidden_size)
    _, routing_map = router(x)
    assert router.local_tokens_per_expert.tolist() == routing_map.sum(0).float().tolist()
    assert router.local_tokens_per_expert.sum().item() == 12 * cfg.num_experts_per_tok
    with torch.no_grad():
        router(x)                                   # evaluation: not counted
    assert router.local_tokens_per_expert.sum().item() == 12 * cfg.num_experts_per_tok
