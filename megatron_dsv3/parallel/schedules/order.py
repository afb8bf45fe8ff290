"""The order of pipeline operations on each rank: THE definition shared by the simulator
(``simulate.py``, ``tools/schedule.py``) and the runtime (``dualpipe.py``), so what the tool prints is
what the ranks run. Pure Python, no torch.

Notation of one operation on one rank (the issue's):

    F{c}:{m}            forward of local chunk c for micro-batch m
    B{c}:{m}            full backward (input grad and weight grad together)
    Bi{c}:{m}           input-grad-only backward; its weight grad runs later as W{c}:{m}
    W{c}:{m}            the deferred weight grad of (c, m), first in first out
    F{c}:{m}+B{d}:{k}   an overlapped pair: forward of (c, m) with the full backward of (d, k)

Chunks, n ranks, M micro-batches:

    1f1b, zb1p   one chunk per rank (c = 0): rank r is stage r of n.
    interleaved  two virtual chunks (Megatron-Core's layout): chunk c on rank r is stage c*n + r of 2n.
    dualpipe     two pipes of n stages. Chunk 0 is the direction entering at rank 0 (rank r holds its
                 stage r), chunk 1 the direction entering at rank n-1 (rank r holds its stage n-1-r, a
                 COPY of what rank n-1-r holds as chunk 0). m counts the micro-batches of one direction,
                 0..M/2-1: the first M/2 micro-batches of a step go through chunk 0, the rest through 1.
    dualpipev    one V of 2n stages: chunk 0 on rank r is stage r, chunk 1 is stage 2n-1-r; m in 0..M-1.

DualPipe / DualPipeV follow the eight steps of DeepSeek's reference (deepseek-ai/DualPipe; the
operation order it executes, recorded on CPU, is test data in ``tests/data/dualpipe_reference``).
"""
from __future__ import annotations

from collections import deque
from typing import Callable, NamedTuple, Optional

SCHEDULES = ("1f1b", "interleaved", "zb1p", "dualpipe", "dualpipev")


class OrderError(ValueError):
    """Counts a schedule cannot serve (the launcher maps it to the flag to change)."""


class Op(NamedTuple):
    """One part of an operation: kind 'F' | 'B' | 'Bi' | 'W', local chunk, micro-batch."""

    kind: str
    chunk: int
    mb: int

    def __str__(self) -> str:
        return f"{self.kind}{self.chunk}:{self.mb}"


def parse(op: str) -> list[Op]:
    """'F0:3' -> [Op('F', 0, 3)]; 'F0:3+B1:2' -> [Op('F', 0, 3), Op('B', 1, 2)]."""
    out = []
    for part in op.split("+"):
        n = 2 if part.startswith("Bi") else 1
        kind, rest = part[:n], part[n:]
        if kind not in ("F", "B", "Bi", "W") or ":" not in rest:
            raise OrderError(f"not an operation: {op!r}")
        c, mb = rest.split(":")
        out.append(Op(kind, int(c), int(mb)))
    if len(out) > 2 or (len(out) == 2 and (out[0].kind != "F" or out[1].kind != "B")):
        raise OrderError(f"a pair is a forward then a full backward: {op!r}")
    return out


def fmt(parts: list[Op]) -> str:
    return "+".join(str(p) for p in parts)


# ----------------------------------------------------------------------------------------------
# Counts
# ----------------------------------------------------------------------------------------------
def validate(schedule: str, n: int, m: int, group: Optional[int] = None) -> None:
    """Raise :class:`OrderError` when ``schedule`` cannot run n ranks with m micro-batches."""
    if schedule not in SCHEDULES:
        raise OrderError(f"unknown schedule {schedule!r}; one of {SCHEDULES}")
    for name, v in (("number of ranks", n), ("number of micro-batches", m)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise OrderError(f"{name} must be a positive integer, got {v!r}")
    if schedule == "dualpipe":
        if n % 2:
            raise OrderError(f"dualpipe needs an even number of pipeline ranks, got {n}")
        if m % 2:
            raise OrderError(f"dualpipe needs an even number of micro-batches (half per direction), got {m}")
        if m < 2 * n:
            raise OrderError(f"dualpipe needs at least 2 x {n} = {2 * n} micro-batches, got {m}")
    elif schedule == "dualpipev":
        if m < 2 * n:
            raise OrderError(f"dualpipev needs at least 2 x {n} = {2 * n} micro-batches, got {m}")
    elif schedule == "interleaved":
        g = n if group is None else group
        # Megatron-Core: the micro-batch group per virtual stage lies in [n, m], and a last partial
        # group holds at least n micro-batches.
        if not n <= g <= m:
            raise OrderError(f"interleaved needs n <= group <= m, got n={n}, group={g}, m={m}")
        if 0 < m % g < n:
            raise OrderError(f"interleaved needs m % group == 0 or >= n, got {m % g} (n={n}, group={g})")


# ----------------------------------------------------------------------------------------------
# Megatron-Core's 1F1B and interleaved 1F1B (2 virtual chunks), and ZB-H1
# ----------------------------------------------------------------------------------------------
def _f(c, m):
    return f"F{c}:{m}"


def _b(c, m, split=False):
    return f"{'Bi' if split else 'B'}{c}:{m}"


def _one_f_one_b(n: int, m: int, r: int) -> list[str]:
    warmup = min(n - r - 1, m)
    seq = [_f(0, i) for i in range(warmup)]
    for i in range(m - warmup):                       # steady state: a forward, then a backward
        seq += [_f(0, warmup + i), _b(0, i)]
    return seq + [_b(0, i) for i in range(m - warmup, m)]


def _interleaved(n: int, m: int, r: int, group: Optional[int] = None, chunks: int = 2) -> list[str]:
    g = n if group is None else group
    table = []                    # Megatron's schedule table: per group, all chunk 0 then all chunk 1
    for start in range(0, m, g):
        stop = m if start + g >= m else start + g
        table += [(c, j) for c in range(chunks) for j in range(start, stop)]
    warmup = min((n - r - 1) * 2 + (chunks - 1) * g, len(table))
    fwd = [_f(c, j) for c, j in table]
    bwd = [_b(chunks - 1 - c, j) for c, j in table]   # backwards walk the chunks in reverse
    seq = fwd[:warmup]
    for k in range(len(table) - warmup):
        seq += [fwd[warmup + k], bwd[k]]
    return seq + bwd[len(table) - warmup:]


def _zb_h1(n: int, m: int, r: int) -> list[str]:
    """ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism"): 1F1B whose backwards are split; stage r
    holds back r weight grads and runs them after its last backward (stage 0 keeps whole backwards)."""
    warmup = min(n - r - 1, m)
    held = min(r, m - warmup)
    seq, queue, nf, nb = [], deque(), 0, 0

    def backward(keep):
        nonlocal nb
        if r == 0:
            seq.append(_b(0, nb))
        else:
            seq.append(_b(0, nb, split=True))
            queue.append(nb)
            if not keep:
                seq.append(f"W0:{queue.popleft()}")
        nb += 1

    for _ in range(warmup):
        seq.append(_f(0, nf)); nf += 1
    for i in range(m - warmup):
        seq.append(_f(0, nf)); nf += 1
        backward(keep=i < held)
    for _ in range(warmup):
        backward(keep=False)
    seq += [f"W0:{j}" for j in queue]
    return seq


# ----------------------------------------------------------------------------------------------
# DualPipe / DualPipeV: eight steps per rank
# ----------------------------------------------------------------------------------------------
class _Emitter:
    """One rank's operations. A rank's local phase 0 is the chunk whose forwards start first on it;
    ``chunk_of[phase]`` is that phase's chunk id in the notation."""

    def __init__(self, chunk_of: tuple[int, int]):
        self.chunk_of = chunk_of
        self.seq: list[str] = []
        self.next_f = [0, 0]
        self.next_b = [0, 0]
        self.w_queue: deque = deque()

    def _take(self, counter, phase):
        c = self.chunk_of[phase]
        counter[c] += 1
        return c, counter[c] - 1

    def F(self, phase):
        self.seq.append(_f(*self._take(self.next_f, phase)))

    def B(self, phase, split=False):
        c, j = self._take(self.next_b, phase)
        self.seq.append(_b(c, j, split))
        if split:
            self.w_queue.append((c, j))

    def W(self):
        c, j = self.w_queue.popleft()
        self.seq.append(f"W{c}:{j}")

    def FB(self, f_phase, b_phase):
        f = _f(*self._take(self.next_f, f_phase))
        self.seq.append(f + "+" + _b(*self._take(self.next_b, b_phase)))


def _dual(n: int, m: int, r: int, v_shape: bool) -> list[str]:
    if v_shape:     # DualPipeV: one V over n ranks; every micro-batch goes down chunk 0, up chunk 1
        half, d, per_pipe, chunk_of = n, r, m, (0, 1)
    else:           # DualPipe: rank r is d stages from its nearer end; the second half sees pipe 1 first
        half, d, per_pipe = n // 2, min(r, n - 1 - r), m // 2
        chunk_of = (1, 0) if r >= n // 2 else (0, 1)
    outer = half - d - 1      # steps 1, 3, 5, 7 shrink towards the middle (DualPipeV: the V's tip)
    inner = d + 1             # steps 2, 6, 8 grow towards it
    at_turn = d == half - 1   # DualPipe: the two middle ranks; DualPipeV: the last rank
    x = _Emitter(chunk_of)

    # Step 1: nF0. Forwards of phase 0 fill the pipe from this rank's near end.
    for _ in range(2 * outer):
        x.F(0)
    # Step 2: nF0F1. A phase-0 and a phase-1 forward, not overlapped.
    for _ in range(inner):
        x.F(0)
        x.F(1)
    # Step 3: nB1W1F1. A split phase-1 backward, its weight grad at once, another phase-1 forward.
    for _ in range(outer):
        x.B(1, split=True)
        x.W()
        x.F(1)
    # Step 4: nF0B1F1B0. The main step: two overlapped pairs per iteration. At the turn of the pipes
    # the first forward and backward are issued one after the other instead of as a pair.
    for i in range(per_pipe - 2 * half + d + 1):
        if i == 0 and at_turn:
            x.F(0)
            x.B(1)
        else:
            x.FB(0, 1)
        x.FB(1, 0)
    # Step 5: nB1F1B0. No phase-0 forward is left: a full phase-1 backward, then one pair.
    for _ in range(outer):
        x.B(1)
        x.FB(1, 0)
    # Step 6: nB1B0. Backward pairs; from iteration inner // 2 on they are split (weight grads wait),
    # starting with that iteration's phase-1 backward when d is odd, its phase-0 backward when even.
    first = inner // 2
    for i in range(inner):
        x.B(1, split=i > first or (i == first and d % 2 == 1))
        x.B(0, split=i >= first)
    # Step 7: nWB0. A waiting weight grad, then a split phase-0 backward.
    for _ in range(outer):
        x.W()
        x.B(0, split=True)
    # Step 8: nW. The remaining weight grads.
    for _ in range(inner):
        x.W()
    assert not x.w_queue
    return x.seq


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def ops(schedule: str, n: int, m: int, group: Optional[int] = None) -> list[list[str]]:
    """Per-rank operation lists of ``schedule`` for n ranks and m micro-batches (for dualpipe m is
    the total over both directions; ``group``: Megatron's microbatch_group_size_per_vp_stage)."""
    validate(schedule, n, m, group)
    if schedule == "1f1b":
        return [_one_f_one_b(n, m, r) for r in range(n)]
    if schedule == "interleaved":
        return [_interleaved(n, m, r, group) for r in range(n)]
    if schedule == "zb1p":
        return [_zb_h1(n, m, r) for r in range(n)]
    return [_dual(n, m, r, v_shape=schedule == "dualpipev") for r in range(n)]


def pipes(schedule: str) -> int:
    """Model copies the micro-batches flow through (dualpipe: one per direction)."""
    return 2 if schedule == "dualpipe" else 1


def chunks_per_rank(schedule: str) -> int:
    return 1 if schedule in ("1f1b", "zb1p") else 2


def stages(schedule: str, n: int) -> int:
    """Stages of one pipe (one model copy)."""
    return 2 * n if schedule in ("interleaved", "dualpipev") else n


def layout(schedule: str, n: int) -> Callable[[int, int], tuple[int, int]]:
    """(rank, chunk) -> (pipe, stage). A micro-batch of pipe p goes through stages 0..S-1 of p in its
    forward and back in its backward; dualpipe has two pipes (each a full model copy)."""
    if schedule in ("1f1b", "zb1p"):
        return lambda r, c: (0, r)
    if schedule == "interleaved":
        return lambda r, c: (0, c * n + r)
    if schedule == "dualpipe":
        return lambda r, c: (c, r if c == 0 else n - 1 - r)
    if schedule == "dualpipev":
        return lambda r, c: (0, r if c == 0 else 2 * n - 1 - r)
    raise OrderError(f"unknown schedule {schedule!r}")


def where(schedule: str, n: int, pipe: int, stage: int) -> tuple[int, int]:
    """The (rank, chunk) holding ``stage`` of ``pipe`` (the inverse of :func:`layout`)."""
    at = layout(schedule, n)
    for r in range(n):
        for c in range(chunks_per_rank(schedule)):
            if at(r, c) == (pipe, stage):
                return r, c
    raise OrderError(f"{schedule}: no rank holds stage {stage} of pipe {pipe}")


def micro_batches_per_pipe(schedule: str, m: int) -> int:
    return m // 2 if schedule == "dualpipe" else m


def global_micro_batch(schedule: str, m: int, pipe: int, mb: int) -> int:
    """Index in the step's global batch of micro-batch ``mb`` of ``pipe``."""
    return pipe * (m // 2) + mb if schedule == "dualpipe" else mb


def check_valid(schedule: str, n: int, m: int, rank_ops: list[list[str]]) -> None:
    """Raise :class:`OrderError` unless every rank forwards and backwards each of its (chunk,
    micro-batch) exactly once, forward first, each chunk's forwards and backwards in micro-batch
    order, and runs one W for every split backward and no other."""
    if len(rank_ops) != n:
        raise OrderError(f"expected {n} ranks, got {len(rank_ops)}")
    chunks = range(chunks_per_rank(schedule))
    mb = micro_batches_per_pipe(schedule, m)
    want = {(c, j) for c in chunks for j in range(mb)}
    for r, seq in enumerate(rank_ops):
        fwd, bwd, split, wdone = set(), set(), set(), set()
        next_f, next_b = dict.fromkeys(chunks, 0), dict.fromkeys(chunks, 0)
        for op in seq:
            for kind, c, j in parse(op):
                key = (c, j)
                if key not in want:
                    raise OrderError(f"rank {r}: {op} is out of range")
                if kind == "F":
                    if j != next_f[c]:
                        raise OrderError(f"rank {r}: forward {key} out of order")
                    next_f[c] += 1
                    fwd.add(key)
                elif kind in ("B", "Bi"):
                    if key not in fwd:
                        raise OrderError(f"rank {r}: backward {key} before its forward")
                    if key in bwd:
                        raise OrderError(f"rank {r}: backward {key} twice")
                    if j != next_b[c]:     # the runtime's message streams rely on it
                        raise OrderError(f"rank {r}: backward {key} out of order")
                    next_b[c] += 1
                    bwd.add(key)
                    if kind == "Bi":
                        split.add(key)
                elif key not in split or key in wdone:
                    raise OrderError(f"rank {r}: W {key} without a split backward waiting for it")
                else:
                    wdone.add(key)
        if fwd != want or bwd != want:
            raise OrderError(f"rank {r}: missing forwards {sorted(want - fwd)}, backwards {sorted(want - bwd)}")
        if wdone != split:
            raise OrderError(f"rank {r}: weight grads never run for {sorted(split - wdone)}")
