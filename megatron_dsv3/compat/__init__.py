"""Where megatron-dsv3 changes Megatron-Core itself: the CPU backend (``cpu_backend``) and the named,
fingerprinted patches (``patches``, a link to the repository's top-level ``patches/``)."""
