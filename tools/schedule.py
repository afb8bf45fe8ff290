"""Simulate a pipeline schedule: bubble, peak activations, parameter copies, per-rank operations.

    .venv/bin/python tools/schedule.py --schedule dualpipe --pp 8 --microbatches 20
    .venv/bin/python tools/schedule.py --schedule dualpipe --pp 8 --microbatches 20 --f 1 --b 1.5 --w 0.5 --fb 2 --json
    .venv/bin/python tools/schedule.py --schedule dualpipev --pp 4 --microbatches 10 --ops
    .venv/bin/python tools/schedule.py --schedule dualpipe --pp 8 --microbatches 20 --png dualpipe.png

Schedules: 1f1b, interleaved (2 virtual chunks, Megatron-Core's), zb1p (ZB-H1), dualpipe, dualpipev
(for dualpipev --pp is the number of ranks N; its V has 2N stages). The orders come from
``megatron_dsv3.parallel.schedules.order``, the same definition the training ranks execute.

Durations (any unit): --f forward chunk, --b full backward chunk, --w its weight-grad part (an
input-grad-only backward costs B - W), --fb an overlapped forward+backward pair (default F + B).
Sends take no time.

--json    {"bubble", "table2_bubble", "peak_activations", "param_copies", ...}: bubble = max over ranks
          of makespan minus that rank's busy time; peak_activations = micro-batches whose forward is
          done and backward not, max over ranks, in stages of one model copy (the report's unit)
--ops     {"ranks": [[op, ...], ...]}: each rank's operations, F{c}:{m} B{c}:{m} Bi{c}:{m} W{c}:{m}
          F{c}:{m}+B{c2}:{m2} (see order.py for what c and m mean)
--png F   a timeline in the style of the report's Figure 5 (one row per rank, a colour per kind of
          operation, the micro-batch in each cell; for dualpipe the second direction's cells darker)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from fractions import Fraction

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_dsv3.parallel.schedules.order import SCHEDULES, OrderError, ops, parse  # noqa: E402
from megatron_dsv3.parallel.schedules.simulate import simulate, table2_bubble  # noqa: E402

#: Figure 5's palette: forward, backward, input-grad backward, weight grad, overlapped pair.
COLOURS = {"F": (252, 196, 120), "B": (140, 190, 240), "Bi": (170, 220, 170), "W": (210, 160, 230),
           "FB": (240, 120, 120)}


def _num(text: str):
    """Exact arithmetic for the formulas: '1.5' -> Fraction(3, 2)."""
    return Fraction(text)


def _plain(x):
    if isinstance(x, Fraction):
        return int(x) if x.denominator == 1 else float(x)
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def summary(schedule: str, n: int, m: int, f, b, w, fb) -> dict:
    sim = simulate(schedule, n, m, f, b, w, fb)
    out = {k: _plain(v) for k, v in sim.items() if k != "timeline"}
    out.update(schedule=schedule, pp=n, microbatches=m, f=_plain(f), b=_plain(b), w=_plain(w),
               fb=_plain(fb), table2_bubble=_plain(table2_bubble(schedule, n, f, b, w, fb)))
    return out


LEGEND = (("F", "forward"), ("B", "backward"), ("Bi", "backward for input"), ("W", "backward for weights"),
          ("FB", "overlapped forward & backward"))


def render_png(schedule: str, n: int, m: int, timeline, path: str, unit_px: int = 24) -> None:
    from PIL import Image, ImageDraw

    end = max(t[-1][2] for t in timeline if t)
    row_h, left, top = 22, 58, 20
    legend_w = left + sum(20 + 7 * len(name) for _, name in LEGEND)
    width = max(left + int(float(end) * unit_px) + 4, legend_w)
    img = Image.new("RGB", (width, top + n * row_h + 22), "white")
    draw = ImageDraw.Draw(img)
    draw.text((4, 4), f"{schedule}: {n} ranks, {m} micro-batches", fill="black")
    for r, cells in enumerate(timeline):
        y = top + r * row_h
        draw.text((4, y + 5), f"rank {r}", fill="black")
        for op, start, stop in cells:
            parts = parse(op)
            colour = COLOURS["FB" if len(parts) == 2 else parts[0].kind]
            if schedule == "dualpipe" and parts[0].chunk == 1:
                colour = tuple(int(c * 0.75) for c in colour)
            x0, x1 = left + int(float(start) * unit_px), left + int(float(stop) * unit_px)
            draw.rectangle([x0, y, max(x1 - 1, x0), y + row_h - 3], fill=colour, outline=(90, 90, 90))
            label = "/".join(str(p.mb) for p in parts)
            if x1 - x0 >= 7 * len(label):
                draw.text((x0 + 3, y + 5), label, fill="black")
    x, y = left, top + n * row_h + 4
    for kind, name in LEGEND:
        draw.rectangle([x, y, x + 10, y + 10], fill=COLOURS[kind])
        draw.text((x + 14, y), name, fill="black")
        x += 20 + 7 * len(name)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--schedule", required=True, choices=SCHEDULES)
    p.add_argument("--pp", type=int, required=True, help="pipeline ranks (dualpipev: ranks N of the V)")
    p.add_argument("--microbatches", type=int, required=True, help="micro-batches per step (dualpipe: both directions)")
    p.add_argument("--f", type=_num, default=Fraction(1), help="forward chunk time (default 1)")
    p.add_argument("--b", type=_num, default=Fraction(2), help="full backward chunk time (default 2)")
    p.add_argument("--w", type=_num, default=Fraction(1), help="weight-grad part of a backward (default 1)")
    p.add_argument("--fb", type=_num, default=None, help="overlapped forward+backward pair (default F+B)")
    p.add_argument("--json", action="store_true", help="print the simulation summary as JSON")
    p.add_argument("--ops", action="store_true", help='print {"ranks": [[op, ...], ...]} as JSON')
    p.add_argument("--png", default=None, metavar="FILE", help="write a Figure-5 style timeline")
    a = p.parse_args(argv)
    fb = a.f + a.b if a.fb is None else a.fb
    if not (0 <= a.w <= a.b):
        p.error(f"--w {a.w} must lie in [0, --b {a.b}] (an input-grad-only backward costs B - W)")
    try:
        rank_ops = ops(a.schedule, a.pp, a.microbatches)
    except OrderError as e:
        flag = "--pp" if "ranks" in str(e) else "--microbatches"
        p.error(f"{flag}: {e}")
    info = summary(a.schedule, a.pp, a.microbatches, a.f, a.b, a.w, fb)
    if a.png:
        render_png(a.schedule, a.pp, a.microbatches,
                   simulate(a.schedule, a.pp, a.microbatches, a.f, a.b, a.w, fb)["timeline"], a.png)
    if a.json or a.ops:
        doc = dict(info) if a.json else {}
        if a.ops:
            doc["ranks"] = rank_ops
        print(json.dumps(doc))
        return 0
    print(f"{a.schedule}: {a.pp} ranks, {a.microbatches} micro-batches; F={info['f']} B={info['b']} "
          f"W={info['w']} F&B={info['fb']}")
    print(f"  makespan {info['makespan']}, bubble {info['bubble']} (Table 2 formula: "
          f"{info['table2_bubble']}), peak activations {info['peak_activations']} stages, "
          f"parameter copies {info['param_copies']}")
    for r, seq in enumerate(rank_ops):
        print(f"  rank {r} (busy {info['busy'][r]}, idle {info['idle'][r]}): " + " ".join(seq))
    if a.png:
        print(f"  timeline: {a.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
