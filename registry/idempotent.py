"""Registering is idempotent per MLflow run: a retried or re-run register task finds its version."""

from __future__ import annotations

from qlora.tracking.names import filter_literal


def version_of_run(client, name: str, run_id: str):
    """The newest version of ``name`` logged from ``run_id``, or None (then it is safe to register)."""
    import mlflow

    try:
        found = client.search_model_versions(f"name = {filter_literal(name)} and run_id = {filter_literal(run_id)}")
    except mlflow.exceptions.MlflowException as e:
        if "RESOURCE_DOES_NOT_EXIST" in str(e.error_code):
            return None
        raise
    return max(found, key=lambda mv: int(mv.version)) if found else None
