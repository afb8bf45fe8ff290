"""adam_resume: placeholder until measured (see megatron_dsv3.pretrain tests)."""
from __future__ import annotations

from . import Patch

PATCH = Patch("adam_resume", "not yet measured", lambda: None, {})
