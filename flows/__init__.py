"""The wiring: the Prefect flow (``finetune``), its task wrappers (``stages``), the approval pause
(``approval``) and the ``qlora`` command line (``cli``). The only package that may import every other."""

# OMP_WAIT_POLICY is left to the user. PASSIVE (idle OpenMP threads sleep at once) was the default for a
# while (issue 13, item 10): it rescued one training from spinning threads of *other* processes on a loaded
# machine (194 s -> 9 s), but on an idle one it halved the training speed (200 demo steps: 40.9 s passive vs
# 21.4 s with the runtime's default spin-then-sleep), the common case. Our own runs never oversubscribe:
# each sizes its threads to cores / train.slots_per_worker (qlora/locks.py). On a machine shared with
# other work, export OMP_WAIT_POLICY=PASSIVE before starting the worker.
