"""dsv3-plan from a source checkout: ``python tools/plan.py ...`` = ``dsv3-plan ...``
(megatron_dsv3/training/plan.py; ``--help`` lists the planner's own flags).

    python tools/plan.py --preset deepseek-v3 --json
    python tools/plan.py --nodes 256 $(DSV3_PRINT_ARGS=1 bash examples/h800_dsv3_671b.sh)
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    from megatron_dsv3.training.plan import main

    sys.exit(main())
