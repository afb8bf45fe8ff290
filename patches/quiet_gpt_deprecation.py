"""quiet_gpt_deprecation: Megatron-Core 0.19.2 logs "GPTModel IS DEPRECATED" on every model build.

megatron-dsv3 builds Megatron-Core's ``GPTModel`` on purpose (see the README's design section for
what moving to ``HybridModel`` would take); the warning tells our users to do something they cannot.
A logging filter on ``GPTModel``'s module logger drops exactly that record; every other message of
that logger passes.
"""
from __future__ import annotations

import logging

from . import Patch

LOGGER = "megatron.core.models.gpt.gpt_model"
PREFIX = "GPTModel IS DEPRECATED"


class _DropDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(PREFIX)


def _install(patch: Patch) -> None:
    logger = logging.getLogger(LOGGER)
    patch.set(logger, "filters", [*logger.filters, _DropDeprecation()])


PATCH = Patch(
    "quiet_gpt_deprecation",
    "GPTModel.__init__ logs a deprecation warning on every build of the model we build on purpose",
    _install,
    {"megatron.core.models.gpt.gpt_model:GPTModel.__init__": "f2a7ff7b71bf"},
)
