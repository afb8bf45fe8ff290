"""Applies the token-keyed gamma / lambda schedules (:mod:`megatron_dsv3.config.schedules`) each step.

The values are set on the model config, where Megatron-Core's ``finalize_model_grads`` (the expert-bias
update) and its MTP loss scaling read them.
"""
from __future__ import annotations

#: {DSv3 field: Schedule} of this run (``args.dsv3_schedules``, parsed once by the argument resolution).
_SCHEDULES: dict = {}


def install(args) -> None:
    _SCHEDULES.clear()
    _SCHEDULES.update(getattr(args, "dsv3_schedules", {}) or {})


def apply(model, args) -> None:
    """Set gamma and lambda for the current consumed tokens on the model config."""
    if not _SCHEDULES:
        return
    from megatron.core.utils import get_model_config

    config = get_model_config(model)
    tokens = args.consumed_train_samples * args.seq_length
    if "bias_update_rate" in _SCHEDULES:
        config.moe_router_bias_update_rate = config.bias_update_rate = _SCHEDULES["bias_update_rate"].at(tokens)
    if "mtp_lambda" in _SCHEDULES and config.mtp_num_layers:
        config.mtp_loss_scaling_factor = config.mtp_lambda = _SCHEDULES["mtp_lambda"].at(tokens)
