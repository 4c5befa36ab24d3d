"""The MLflow Model Registry side: ``register`` (stage 5: log, register, gate, aliases), ``gate``
(paired bootstrap), ``aliases`` (promote, rollback, history), ``lineage`` (tags, description),
``consumer`` (load ``models:/...`` and generate), ``merged``, ``idempotent``. Imports ``qlora`` only."""
