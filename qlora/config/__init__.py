"""Configuration: ``schema`` is the one typed config tree (``PipelineConfig`` and a section per stage),
``files`` loads a YAML file plus ``--set`` overrides into it, ``checks`` holds the config-load checks
against transformers and the warnings for values that load but are almost certainly a mistake."""
