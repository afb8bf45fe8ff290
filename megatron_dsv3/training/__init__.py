"""Training on megatron.training: the launcher (``launcher``: arguments, launch checks, providers),
DSv3 metrics for the console and W&B (``metrics``, ``heatmaps``), the exact FLOP count (``flops``), the
coefficient schedules applied each step (``coefficients``) and an offline W&B reader (``wandb_offline``)."""
