"""megatron-dsv3: DeepSeek-V3 on Megatron-Core."""
__version__ = "0.1.0"
