"""DeepSeek-V3 configuration: the config dataclass, presets, HF config.json reading, the token-keyed
coefficient schedules and THE table mapping DSv3 fields to Megatron-LM flags and Megatron-Core fields.

    from megatron_dsv3.config import DSv3Config, cpu_overrides
    cfg = DSv3Config.from_preset("deepseek-v3")
"""
from .dsv3 import DSV3_FIELDS, DSv3Config, missing_coefficients
from .layout import DSv3ConfigError, check_parallel_layout
from .mapping import DERIVED_MEGATRON_FIELDS, has_moe
from .presets import PRESETS, RECIPES


def cpu_overrides() -> dict:
    """Megatron-Core settings every CPU run needs (fp32, CPU init, local layers, no fused kernels):
    the ``core`` column of the CPU backend's one settings table."""
    from ..compat.cpu_backend import cpu_core_settings

    return cpu_core_settings()


__all__ = ["DSv3Config", "DSv3ConfigError", "PRESETS", "RECIPES", "DSV3_FIELDS", "DERIVED_MEGATRON_FIELDS",
           "check_parallel_layout", "cpu_overrides", "has_moe", "missing_coefficients"]
