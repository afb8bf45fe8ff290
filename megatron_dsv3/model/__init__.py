"""The DeepSeek-V3 model on Megatron-Core: maths per concept (``rope``, ``norm``, ``mla``, ``router``,
``moe``, ``mtp``), the layer classes of each backend (``backends``) and the layer specs plus the model
builder (``spec``)."""
