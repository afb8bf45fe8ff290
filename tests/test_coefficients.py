"""Token-keyed gamma / lambda schedules and how the launcher applies them each step."""
from __future__ import annotations

import types

import pytest

from megatron_dsv3.training import coefficients
from megatron_dsv3.config.schedules import Schedule, ScheduleError, parse_tokens


def test_parse_and_piecewise_constant():
    assert parse_tokens("14.3T") == 14_300_000_000_000 and parse_tokens("500k") == 500_000
    s = Schedule.parse("0:0.001,14.3T:0", "--x")
    assert s.at(0) == 0.001 and s.at(14_299_999_999_999) == 0.001 and s.at(14_300_000_000_000) == 0.0
    lam = Schedule.parse("0:0.3, 10T:0.1", "--y")
    assert (lam.at(5 * 10**12), lam.at(10**13), lam.at(10**15)) == (0.3, 0.1, 0.1)


@pytest.mark.parametrize("text, what", [("10:0.1", "token 0"), ("0:0.1,5:0.2,5:0.3", "increase"),
                                        ("0:-1", ">= 0"), ("0:0.1,xT:0", "token count"), ("0.1", "TOKENS:VALUE")])
def test_bad_schedules_name_the_flag(text, what):
    with pytest.raises(ScheduleError, match="--flag") as info:
        Schedule.parse(text, "--flag")
    assert what in str(info.value)


def test_schedules_set_gamma_and_lambda_on_the_model_config(monkeypatch):
    """What forward_step does before each micro-batch: Megatron's finalize_model_grads reads
    moe_router_bias_update_rate and the MTP loss reads mtp_loss_scaling_factor from this config."""
    config = types.SimpleNamespace(moe_router_bias_update_rate=0.001, bias_update_rate=0.001,
                                   mtp_loss_scaling_factor=0.3, mtp_lambda=0.3, mtp_num_layers=1)
    model = types.SimpleNamespace(config=config)
    monkeypatch.setattr(coefficients, "_SCHEDULES", {"bias_update_rate": Schedule.parse("0:0.001,1M:0", "g"),
                                                     "mtp_lambda": Schedule.parse("0:0.3,2M:0.1", "l")})
    args = types.SimpleNamespace(seq_length=1000, consumed_train_samples=999)      # 999k tokens
    coefficients.apply(model, args)
    assert (config.moe_router_bias_update_rate, config.mtp_loss_scaling_factor) == (0.001, 0.3)
    args.consumed_train_samples = 1500                                             # 1.5M tokens
    coefficients.apply(model, args)
    assert (config.moe_router_bias_update_rate, config.bias_update_rate) == (0.0, 0.0)
    assert config.mtp_loss_scaling_factor == 0.3
    args.consumed_train_samples = 2000
    coefficients.apply(model, args)
    assert config.mtp_loss_scaling_factor == config.mtp_lambda == 0.1
