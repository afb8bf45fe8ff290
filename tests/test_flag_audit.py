"""The Megatron-LM flags that act on the modules we replaced (training/flag_audit.py): every audited
flag is a real launcher flag, every refused one stops a launch before any process group exists with
the flag named, honoured ones launch, and the README lists them all."""
from __future__ import annotations

import argparse
import functools
import os
import re
import subprocess
import sys

import pytest

from launch import ROOT, TINY
from megatron_dsv3 import registry
from megatron_dsv3.config import PRESETS
from megatron_dsv3.config.mapping import ROWS
from megatron_dsv3.training import flag_audit as fa
from megatron_dsv3.training import launcher
from megatron_dsv3.training.arguments import LaunchError, build_parser


@pytest.fixture(autouse=True)
def _launch_checks_build_no_process_group(no_process_groups):
    """Every test here runs launch checks only (tests/conftest.py: no_process_groups)."""


def _prepare(*extra):
    return launcher.prepare(list(TINY) + ["--train-iters", "2", *extra])


def _fails(*extra) -> str:
    with pytest.raises(LaunchError) as info:
        _prepare(*extra)
    return str(info.value.code)


@functools.lru_cache(maxsize=1)
def _actions() -> dict:
    return {o: a for a in build_parser()._actions for o in a.option_strings}


def _is_switch(action) -> bool:
    return action.nargs == 0


# ----------------------------------------------------------------------------------------------
# The table itself
# ----------------------------------------------------------------------------------------------
def test_every_audited_flag_is_a_launcher_flag_with_its_dest():
    actions = _actions()
    options = [f.option for f in fa.audit()]
    assert len(options) == len(set(options)), "an option is audited twice"
    for flag in fa.audit():
        assert flag.option in actions, f"{flag.option} is not a flag of the launcher"
        assert actions[flag.option].dest == flag.dest, flag.option
        assert flag.status in (fa.HONOURED, fa.REFUSED, fa.NO_EFFECT, fa.FIXED), flag.option
        assert flag.note, flag.option


def test_the_mapping_table_is_referenced_not_repeated():
    """Every flag of config/mapping.py appears once: fixed rows as 'fixed' (refused by checks.py), the
    others as honoured (or audited explicitly when the flag has no DSv3 field of its own)."""
    by_dest = {f.dest: f for f in fa.audit()}
    explicit = {f.dest for f in fa.AUDIT_EXPLICIT}
    for row in ROWS:
        if row.flag is None:
            continue
        assert row.flag in by_dest, row.flag
        if row.fixed:
            assert by_dest[row.flag].status == fa.FIXED and row.flag not in explicit, row.flag
        elif row.field is None:
            assert row.flag in explicit, f"{row.flag} is derived from the model: audit what a given value does"


def test_refusals_say_why_and_what_to_do():
    for flag in fa.AUDIT_EXPLICIT:
        if flag.status == fa.REFUSED or flag.refuse_when is not None:
            text = (flag.error or flag.note).lower()
            assert re.search(r"\b(drop|give|use)\b", text), f"{flag.option}: say what to do"


# ----------------------------------------------------------------------------------------------
# Launches
# ----------------------------------------------------------------------------------------------
_SPECIAL = {"--moe-shared-expert-overlap"}   # needs a registered dispatcher: its own test below
_REFUSABLE = [f for f in fa.AUDIT_EXPLICIT
              if (f.status == fa.REFUSED or f.refuse_when is not None) and f.option not in _SPECIAL]
#: Refused whatever the rest of the launch says: all given at once, each must be named.
_PLAIN = [f for f in _REFUSABLE if f.refuse_when is None]
#: Refused under a condition (on the value, the model or other flags): one launch each.
_CONDITIONAL = [f for f in _REFUSABLE if f.refuse_when is not None]
#: A few plain ones launched alone too (the message then starts with the flag).
_ALONE = ("--attention-backend", "--qk-clip", "--rotary-interleaved", "--apply-layernorm-1p", "--moe-router-fusion",
          "--moe-z-loss-coeff", "--mtp-detach-heads", "--checkpoint-activations", "--cuda-graph-impl")


def _argv(flag) -> list[str]:
    assert flag.example or _is_switch(_actions()[flag.option]), f"{flag.option}: give an example value in the table"
    return [flag.option, *flag.example]


def test_every_plain_refused_flag_is_named_in_one_launch():
    """All unconditionally refused flags in one launch: it fails before any process group, and the
    message names every one of them (with what to do)."""
    argv = [token for flag in _PLAIN for token in _argv(flag)]
    msg = _fails(*argv)
    lines = msg.split("\n  ")
    assert lines[0].endswith("not supported:"), msg[:300]
    named = {line.split(":")[0].split(" ")[0] for line in lines[1:]}
    assert named == {f.option for f in _PLAIN}, sorted(named ^ {f.option for f in _PLAIN})


@pytest.mark.parametrize("flag", _CONDITIONAL + [f for f in _PLAIN if f.option in _ALONE],
                         ids=lambda f: f.option)
def test_refused_flag_stops_the_launch_naming_it(flag):
    msg = _fails(*_argv(flag))
    assert msg.startswith(f"dsv3-pretrain: error: {flag.option}"), msg


def test_several_refused_flags_are_named_together():
    msg = _fails("--qk-clip", "--moe-z-loss-coeff", "0.01", "--rotary-interleaved")
    for option in ("--qk-clip", "--moe-z-loss-coeff 0.01", "--rotary-interleaved"):
        assert f"\n  {option}:" in msg, msg


def test_shared_expert_overlap_with_a_registered_dispatcher(monkeypatch):
    """A dispatcher registered in megatron_dsv3.registry is not handed the shared experts."""
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    class Mine(MoEAlltoAllTokenDispatcher):
        pass

    monkeypatch.setitem(registry.DISPATCHERS, "mine_for_test", Mine)
    msg = _fails("--moe-shared-expert-overlap", "--moe-token-dispatcher-type", "mine_for_test")
    assert "--moe-shared-expert-overlap" in msg and "alltoall" in msg
    _prepare("--moe-shared-expert-overlap")                       # Megatron's own alltoall: honoured
    _prepare("--moe-token-dispatcher-type", "mine_for_test")      # no overlap: fine


@pytest.mark.parametrize("extra", [
    ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"],
    ["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "2",
     "--distribute-saved-activations"],
    ["--recompute-activations", "--moe-layer-recompute"],
    ["--moe-per-layer-logging", "--hidden-dropout", "0.1", "--no-bias-dropout-fusion",
     "--no-bias-swiglu-fusion", "--no-gradient-accumulation-fusion"],
    ["--moe-router-enable-expert-bias", "--moe-router-score-function", "sigmoid", "--rope-type", "yarn",
     "--rotary-base", "20000", "--norm-epsilon", "1e-5", "--transformer-impl", "local"],
    # no effect (what our modules already do) and defaults given explicitly
    ["--attention-softmax-in-fp32", "--no-masked-softmax-fusion", "--no-rope-fusion", "--no-persist-layer-norm",
     "--no-bias-gelu-fusion", "--no-create-attention-mask-in-dataloader", "--moe-single-grouped-bias",
     "--yarn-correction-range-round-to-int"],
    ["--attention-backend", "auto", "--attention-dropout", "0", "--moe-token-drop-policy", "probs",
     "--kv-channels", str(PRESETS["tiny"]["v_head_dim"]), "--mlp-chunks-for-training", "1",
     "--moe-expert-capacity-factor", "-1", "--offload-modules", "expert_fc1", "moe_act"],
], ids=["full-uniform", "full-block", "selective+moe", "fusions-dropout", "model-flags", "no-effect",
        "defaults"])
def test_honoured_flags_launch(extra):
    args = _prepare(*extra)
    assert args.dsv3_fields["v_head_dim"] == PRESETS["tiny"]["v_head_dim"]


def test_full_recompute_reaches_the_model_config():
    """--recompute-granularity full passes Megatron's validation into the DSv3Config that TransformerBlock
    reads (its checkpointed forward calls our layers with TransformerLayer's keywords)."""
    from megatron.training.arguments import validate_args

    args = _prepare("--recompute-granularity", "full", "--recompute-method", "uniform",
                    "--recompute-num-layers", "1")
    validate_args(args, {})
    cfg = launcher.model_config_from_args(launcher._with(args, padded_vocab_size=256))
    assert (cfg.recompute_granularity, cfg.recompute_method, cfg.recompute_num_layers) == ("full", "uniform", 1)


def test_refusal_reads_the_value_not_the_spelling():
    """A flag given with Megatron's default value asks for nothing and is accepted; the refusal depends
    on the value (and on the model where it matters)."""
    flag = next(f for f in fa.AUDIT_EXPLICIT if f.option == "--mlp-chunks-for-training")
    dense = {"first_k_dense_replace": 2, "num_layers": 2, "mtp_num_layers": None}
    moe = dict(dense, first_k_dense_replace=1)
    args = argparse.Namespace(mlp_chunks_for_training=2)
    assert flag.refuses(args, moe, 1) and not flag.refuses(args, dense, 1)
    kv = next(f for f in fa.AUDIT_EXPLICIT if f.option == "--kv-channels")
    assert not kv.refuses(argparse.Namespace(kv_channels=16), {"v_head_dim": 16}, None)
    assert kv.refuses(argparse.Namespace(kv_channels=8), {"v_head_dim": 16}, None)


# ----------------------------------------------------------------------------------------------
# README
# ----------------------------------------------------------------------------------------------
def test_readme_table_is_generated_from_the_audit():
    out = subprocess.run([sys.executable, "-m", "megatron_dsv3.training.flag_audit"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, TORCHDYNAMO_DISABLE="1", MEGATRON_DSV3_CPU="1"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout == fa.readme_section()
    for flag in fa.audit():
        assert f"| `{flag.option}` | {flag.status} |" in out.stdout, flag.option


def test_readme_lists_every_audited_flag():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    missing = [f.option for f in fa.audit() if f"`{f.option}`" not in readme]
    assert not missing, (f"README.md lacks {len(missing)} audited flags (paste `python -m "
                         f"megatron_dsv3.training.flag_audit`): {missing[:10]}")
