"""The wiring: the Prefect flow (``finetune``), its task wrappers (``stages``), the approval pause
(``approval``) and the ``qlora`` command line (``cli``). The only package that may import every other."""
