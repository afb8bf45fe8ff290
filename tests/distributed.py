"""The spawn helper for multi-rank gloo tests (the package's own, shared with the examples)."""
from megatron_dsv3.parallel.world import run_cpu_world as run_world  # noqa: F401
