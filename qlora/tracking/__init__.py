"""MLflow: ``runs`` (which store and experiment, one run per flow run), ``outage`` (a tracking server that
stops answering), ``records`` (the config and trial records a run leaves), ``names`` (registered-model names)."""
