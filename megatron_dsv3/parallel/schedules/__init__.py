"""Pipeline schedules megatron-dsv3 adds to Megatron-Core: DeepSeek's DualPipe and DualPipeV.

    order.py      THE per-rank operation order (1f1b, interleaved, zb1p, dualpipe, dualpipev), used by
                  the simulator and by the runtime
    simulate.py   event simulation of those orders; the report's Table 2 formulas
    wgrad.py      the weight-gradient store: input-grad-only backwards, weight grads later (W)
    placement.py  which stage each model chunk of a rank is, building the chunks under that view, the
                  mirrored copies (DualPipe) and their gradients
    dualpipe.py   the forward-backward functions registered as --pipeline-schedule dualpipe / dualpipev
    trace.py      per-rank record of a run (executed operations, timeline, live activation bytes)
"""
