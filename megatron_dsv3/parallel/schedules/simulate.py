"""Event simulation of the per-rank orders of :mod:`.order`, and the report's Table 2 formulas.

Each rank runs its list in order; an operation starts when the rank is free and its inputs have
arrived (sends take no time): the forward of stage s of a micro-batch needs that micro-batch's forward
of stage s-1, a backward (B, Bi, or the B of a pair) of stage s needs its backward of stage s+1 (the
last stage's needs its own forward). Costs: F = f, B = b, Bi = b - w, W = w, a pair = fb.

Table 2 of the DeepSeek-V3 report (PP ranks; F&B an overlapped pair):

    1F1B      bubble (PP-1)(F+B)            parameters 1x   activations PP
    ZB1P      bubble (PP-1)(F+B-2W)         parameters 1x   activations PP
    DualPipe  bubble (PP/2-1)(F&B+B-3W)     parameters 2x   activations PP+1

The DualPipe formula is exact in this simulation when a split backward's input part costs one
forward (B - W = F, how the report's figure draws the cells), W <= F and B <= F&B <= F+B; for other
durations the simulated bubble is the truth and the formula an estimate. DualPipeV on PP/2 ranks
has DualPipe's bubble with one parameter copy.
"""
from __future__ import annotations

from typing import Optional

from .order import chunks_per_rank, layout, ops, parse, stages

def table2_bubble(schedule: str, n: int, f=1.0, b=2.0, w=1.0, fb=None):
    """The report's bubble for ``schedule`` on n ranks (dualpipev: its V's 2n stages are the PP of
    the formula); None for a schedule Table 2 does not list."""
    fb = f + b if fb is None else fb
    if schedule in ("dualpipe", "dualpipev"):
        pp = n if schedule == "dualpipe" else 2 * n
        return (pp // 2 - 1) * (fb + b - 3 * w)
    if schedule == "1f1b":
        return (n - 1) * (f + b)
    if schedule == "zb1p":
        return (n - 1) * (f + b - 2 * w)
    return None


def simulate(schedule: str, n: int, m: int, f=1.0, b=2.0, w=1.0, fb=None,
             rank_ops: Optional[list[list[str]]] = None) -> dict:
    """Run ``ops(schedule, n, m)`` (or ``rank_ops``) on the event model above.

    Returns makespan; busy[r], idle[r] (= makespan - busy[r]); bubble = max idle; timeline[r] =
    [(op, start, end)]; activations[r] and peak_activations: (chunk, micro-batch) activations alive at
    once (from the start of a forward to the end of its backward's input part; an overlapped pair holds
    both), unit one micro-batch through one stage of a model copy (Table 2's unit);
    peak_activations_until_w: the same but a split backward's activations live until its W (what
    the weight grad keeps: the layer inputs); pp_stages, stages_per_rank, param_copies,
    params_per_rank (in stages).
    """
    if rank_ops is None:
        rank_ops = ops(schedule, n, m)
    fb = f + b if fb is None else fb
    cost = {"F": f, "B": b, "Bi": b - w, "W": w}
    n_stages, at = stages(schedule, n), layout(schedule, n)

    f_end, b_end = {}, {}            # (pipe, stage, mb) -> finish time
    pos, free_at, busy = [0] * n, [0] * n, [0] * n
    timeline = [[] for _ in range(n)]
    left = sum(len(s) for s in rank_ops)
    while left:
        progressed = False
        for r in range(n):
            while pos[r] < len(rank_ops[r]):
                parts = parse(rank_ops[r][pos[r]])
                start = free_at[r]
                for kind, c, j in parts:
                    pipe, s = at(r, c)
                    if kind == "F":
                        dep = f_end.get((pipe, s - 1, j)) if s > 0 else 0
                    elif kind in ("B", "Bi"):
                        dep = b_end.get((pipe, s + 1, j)) if s < n_stages - 1 else f_end.get((pipe, s, j))
                    else:
                        dep = 0
                    if dep is None:
                        break
                    start = max(start, dep)
                else:
                    dur = fb if len(parts) == 2 else cost[parts[0].kind]
                    end = start + dur
                    for kind, c, j in parts:
                        pipe, s = at(r, c)
                        if kind == "F":
                            f_end[(pipe, s, j)] = end
                        elif kind in ("B", "Bi"):
                            b_end[(pipe, s, j)] = end
                    timeline[r].append((rank_ops[r][pos[r]], start, end))
                    free_at[r], busy[r] = end, busy[r] + dur
                    pos[r] += 1
                    left -= 1
                    progressed = True
                    continue
                break
        if not progressed:
            stuck = {r: rank_ops[r][pos[r]] for r in range(n) if pos[r] < len(rank_ops[r])}
            raise ValueError(f"deadlock: the ranks wait on each other at {stuck}")

    makespan = max(free_at)
    acts = _peaks(rank_ops, until_w=False)
    per_rank = chunks_per_rank(schedule)
    return {
        "makespan": makespan, "busy": busy, "idle": [makespan - x for x in busy],
        "bubble": max(makespan - x for x in busy), "timeline": timeline,
        "activations": acts, "peak_activations": max(acts),
        "peak_activations_until_w": max(_peaks(rank_ops, until_w=True)),
        "pp_stages": n_stages, "stages_per_rank": per_rank,
        "param_copies": 2 if schedule == "dualpipe" else 1, "params_per_rank": per_rank,
    }


def _peaks(rank_ops, until_w: bool) -> list[int]:
    out = []
    for seq in rank_ops:
        live = peak = 0
        for op in seq:
            parts = parse(op)
            live += sum(p.kind == "F" for p in parts)
            peak = max(peak, live)
            live -= sum(p.kind == "B" or (p.kind == "Bi" and not until_w) or (p.kind == "W" and until_w)
                        for p in parts)
        out.append(peak)
    return out
