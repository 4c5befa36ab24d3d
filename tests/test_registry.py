"""The model registry against a real ``mlflow server``: lineage, the promotion gate, consumers, commands."""

from __future__ import annotations

import json

import mlflow
import pytest

from qlora.config import RegistryConfig, TrackingConfig
from qlora.tracking import end_run, start_run
from registry import aliases
from registry.register import register_adapter

from .registry_fixtures import mlflow_server, trained  # noqa: F401  (fixtures)


def _run(url, name="registry-test"):
    return start_run(TrackingConfig(uri=url, experiment_name=name), run_name="t", tags={"config_hash": "cafe",
                                                                                         "prefect.flow_run_id": "fr-1"})


def test_probe(trained, mlflow_server):
    base, adapter, report = trained
    print(report.metrics, [(s["prompt"][-40:], s["tuned"], s["base"]) for s in report.samples])
    run = _run(mlflow_server)
    v = register_adapter(base, adapter, report, RegistryConfig(model_name="probe"), run)
    print(v)
    client = mlflow.MlflowClient(mlflow_server)
    mv = client.get_model_version("probe", v.version)
    print(mv.tags, mv.description)
