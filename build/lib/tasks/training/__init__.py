"""Stage 3's parts: ``recipe`` (model, Trainer, fit), ``launch`` (multi-process ranks),
``callbacks`` (divergence guard, outage-proof MLflow logging), ``checkpoints`` (run-dir lock, valid
checkpoints, adapter files). ``tasks/train.py`` is the stage's entry."""
