"""Parallel-layout rules of a DeepSeek-V3 model: ONE definition, used by :class:`DSv3Config` (errors
name its fields) and by the launcher before any process group exists (errors name the flags)."""
from __future__ import annotations

from typing import Optional

from .mapping import FLAG_OF_FIELD, flag_name


class DSv3ConfigError(ValueError):
    """A configuration that is not a valid DeepSeek-V3-style model; the message names the field."""


def describe(field: str, value, style: str) -> str:
    """How an error names a setting: ``field=value`` (Python API) or ``--flag value`` (launcher)."""
    if style == "flag":
        if isinstance(value, bool):
            return flag_name(FLAG_OF_FIELD.get(field, field))
        return f"{flag_name(FLAG_OF_FIELD.get(field, field))} {value}"
    return f"{field}={value!r}"


def check_parallel_layout(*, num_attention_heads: int, n_routed_experts: Optional[int], tp: int, ep: int,
                          sequence_parallel: bool, cp: int = 1, vocab_size: Optional[int] = None,
                          style: str = "field") -> None:
    """Raise :class:`DSv3ConfigError` for a layout the model cannot run in.

    ``n_routed_experts`` is None for a model without MoE layers; ``vocab_size`` None skips the vocab
    check (the launcher pads the vocabulary to a multiple of TP itself).
    """
    d = lambda field, value: describe(field, value, style)  # noqa: E731
    if num_attention_heads % tp:
        raise DSv3ConfigError(
            f"{d('num_attention_heads', num_attention_heads)} is not divisible by "
            f"{d('tensor_model_parallel_size', tp)}: choose a TP size that divides the head count")
    if n_routed_experts is not None and n_routed_experts % ep:
        raise DSv3ConfigError(
            f"{d('n_routed_experts', n_routed_experts)} is not divisible by "
            f"{d('expert_model_parallel_size', ep)}: choose an EP size that divides the expert count")
    if n_routed_experts is not None and tp > 1 and not sequence_parallel:
        raise DSv3ConfigError(
            f"MoE with {d('tensor_model_parallel_size', tp)} needs sequence parallelism "
            f"({d('sequence_parallel', True)})")
    if vocab_size is not None and vocab_size % tp:
        raise DSv3ConfigError(
            f"{d('vocab_size', vocab_size)} is not divisible by {d('tensor_model_parallel_size', tp)}")
    if cp != 1:
        raise DSv3ConfigError(f"{d('context_parallel_size', cp)}: context parallelism is not supported by "
                              "megatron-dsv3's MLA yet")
