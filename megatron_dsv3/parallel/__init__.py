"""Parallel wiring around the model: process-group helpers (``world``), node topology
(``topology``); the token dispatchers and pipeline schedules megatron-dsv3 registers live here too."""
