"""reparse_args: Megatron's own re-parses of the command line see megatron-dsv3's flags too.

``megatron.training.ft_integration.setup`` (start of ``pretrain``) and ``inprocess_restart`` parse
``sys.argv`` again with Megatron's parser alone (unknown flags ignored). A dispatcher name registered
by megatron-dsv3 then fails that parser's ``--moe-token-dispatcher-type`` choices. The patch makes
``arguments.parse_args`` add the launcher's arguments whenever the caller passes none.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

from . import Patch, resolve

TARGET = "megatron.training.arguments:parse_args"

#: The launcher's extra-arguments function (set before the patch is applied).
EXTRA_ARGS: list[Optional[Callable]] = [None]


def _install(patch: Patch) -> None:
    from megatron.training import arguments

    original = resolve(TARGET)
    if EXTRA_ARGS[0] is None:
        raise RuntimeError("reparse_args: no extra-arguments function set")

    @functools.wraps(original)
    def parse_args(extra_args_provider=None, ignore_unknown_args=False):
        return original(extra_args_provider or EXTRA_ARGS[0], ignore_unknown_args)

    patch.set(arguments, "parse_args", parse_args)


PATCH = Patch(
    "reparse_args",
    "ft_integration.setup / inprocess_restart re-parse sys.argv without the launcher's arguments",
    _install,
    {TARGET: "7f2b7750e1be", "megatron.training.ft_integration:setup": "21f6647f86b3",
     "megatron.training.inprocess_restart:maybe_wrap_for_inprocess_restart": "2ef6736fa40a"},
)
