"""Token-keyed schedules for DeepSeek-V3's training coefficients.

The paper states its schedules in training tokens: the bias update speed gamma is 0.001 for the first
14.3T tokens and 0 for the last 500B; the MTP weight lambda is 0.3 for the first 10T tokens, then 0.1
(report sec. 4.2). A schedule is written as ``"TOKENS:VALUE,TOKENS:VALUE,..."``, piecewise constant,
with token counts as plain integers or with a K/M/B/T suffix (powers of 1000):

    --moe-router-bias-update-schedule 0:0.001,14.3T:0
    --mtp-loss-scaling-schedule 0:0.3,10T:0.1

The value at ``t`` consumed tokens is the value of the last point whose key is <= t. The first key
must be 0, keys strictly increase, values are >= 0.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

_SUFFIX = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}


class ScheduleError(ValueError):
    pass


def parse_tokens(text: str) -> int:
    text = text.strip()
    scale = 1.0
    if text and text[-1].upper() in _SUFFIX:
        scale = _SUFFIX[text[-1].upper()]
        text = text[:-1]
    try:
        value = float(text) * scale
    except ValueError:
        raise ScheduleError(f"{text!r} is not a token count (use e.g. 0, 500000, 14.3T)") from None
    if value < 0:
        raise ScheduleError(f"token count {value} is negative")
    return int(round(value))


@dataclass(frozen=True)
class Schedule:
    """Piecewise-constant value over consumed training tokens."""

    tokens: tuple[int, ...]
    values: tuple[float, ...]

    @classmethod
    def parse(cls, text: str, flag: str) -> "Schedule":
        points = []
        for item in text.split(","):
            if ":" not in item:
                raise ScheduleError(f"{flag}: {item!r} is not TOKENS:VALUE (example: 0:0.001,14.3T:0)")
            key, value = item.split(":", 1)
            try:
                points.append((parse_tokens(key), float(value)))
            except (ScheduleError, ValueError) as e:
                raise ScheduleError(f"{flag}: bad point {item!r}: {e}") from None
        tokens = tuple(p[0] for p in points)
        values = tuple(p[1] for p in points)
        if tokens[0] != 0:
            raise ScheduleError(f"{flag}: the first point must start at token 0, got {tokens[0]}")
        if any(b <= a for a, b in zip(tokens, tokens[1:])):
            raise ScheduleError(f"{flag}: token keys must strictly increase, got {list(tokens)}")
        if any(v < 0 for v in values):
            raise ScheduleError(f"{flag}: values must be >= 0, got {list(values)}")
        return cls(tokens, values)

    @classmethod
    def constant(cls, value: float) -> "Schedule":
        return cls((0,), (float(value),))

    def at(self, consumed_tokens: int) -> float:
        return self.values[bisect.bisect_right(self.tokens, consumed_tokens) - 1]
