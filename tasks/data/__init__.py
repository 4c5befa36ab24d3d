"""The data path of stage 1, as plain functions (no model, no torch, no Prefect), in the order it runs:
``read`` (files, folders, hub datasets) -> ``parse`` (rows into conversation turns) -> ``render`` (the
prompt or chat template) -> ``encode`` (token ids and completion-only labels) -> ``drops`` (every dropped
row counted once, against ``data.max_drop_fraction``) -> ``split`` (hold-out and weighted draws) ->
``report``. ``pipeline`` runs them for every source of a mixture (a single ``data.path`` is a mixture of one)."""
