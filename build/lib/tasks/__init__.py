"""The pipeline's stages as plain functions that import and test without Prefect: ``tokenize`` (with
``data/``), ``quantize``, ``train`` (with ``training/``), ``evaluate`` (metrics in ``metrics/``) and
``reporting`` (run report builders). Imports ``qlora`` only; never ``registry`` or ``flows``."""
