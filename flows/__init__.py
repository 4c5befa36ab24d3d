"""The wiring: the Prefect flow (``finetune``), its task wrappers (``stages``), the approval pause
(``approval``) and the ``qlora`` command line (``cli``). The only package that may import every other."""

import os

# Before anything loads torch's OpenMP runtime, which reads this once: idle OpenMP threads sleep instead of
# spinning. Spinning threads of two runs (or of anything else) sharing the cores starve each other: one demo
# training with 2 threads on this 2-core machine under load took 194 s spinning, 9.0 s passive, 7.3 s with
# 1 thread (issue 13, item 10). Set OMP_WAIT_POLICY=ACTIVE to get spinning back on a dedicated machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
