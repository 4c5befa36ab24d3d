"""Several writers, one registry: PostgreSQL behind a real ``mlflow server``, 4 concurrent registrations.

The writers are 4 spawned processes each calling ``register_adapter`` (the register stage without the
rest of the flow: 4 full flow runs would cost minutes of CPU here). Each has its own MLflow run and
its own HTTP connections to the server, which serialises them through PostgreSQL.
"""

from __future__ import annotations

import multiprocessing
import traceback

import mlflow
import pytest

from qlora.config import RegistryConfig, TrackingConfig
from qlora.tracking import start_run
from registry import aliases

from .postgres import Postgres, ensure_installed
from .registry_fixtures import free_port, start_mlflow_server, stop, trained  # noqa: F401

pytestmark = pytest.mark.postgres
NAME = "tiny-concurrent"
WRITERS = 4


@pytest.fixture(scope="module")
def pg_mlflow_server(tmp_path_factory):
    if ensure_installed() is None:
        pytest.skip("PostgreSQL is not installed and cannot be installed here (needs root and apt-get)")
    pg = Postgres(free_port())
    d = tmp_path_factory.mktemp("mlflow-pg")
    try:
        db = pg.start()
        proc, url = start_mlflow_server(db, d / "artifacts", d / "server.log")
    except Exception:
        pg.stop()
        raise
    yield url
    stop(proc)
    pg.stop()


def _register(args) -> tuple[str, str, str]:
    base, adapter, report, url, i = args
    try:
        from registry.register import register_adapter

        run = start_run(TrackingConfig(uri=url, experiment_name="concurrent"), run_name=f"writer-{i}")
        cfg = RegistryConfig(model_name=NAME, bootstrap_resamples=200, consumer_check_prompts=0)  # checked in test_registry
        v = register_adapter(base, adapter, report, cfg, run)
        return v.version, run.run_id, ""
    except Exception:
        return "", "", traceback.format_exc()


def test_concurrent_registrations_on_postgres(trained, pg_mlflow_server):
    base, adapter, report = trained
    # Scores say tuned beats base on every prompt: whichever writer finds no champion promotes itself,
    # the others compare with it (a tie) and stay challenger.
    report = report.model_copy(update={"samples": [s | {"base_correct": 0.0, "tuned_correct": 1.0} for s in report.samples]})
    # spawn, not fork: forking a process that already runs torch and HTTP-client threads deadlocks the children.
    with multiprocessing.get_context("spawn").Pool(WRITERS) as pool:
        results = pool.map(_register, [(base, adapter, report, pg_mlflow_server, i) for i in range(WRITERS)])
    errors = [e for _, _, e in results if e]
    assert not errors, errors[0]

    client = mlflow.MlflowClient(pg_mlflow_server)
    versions = sorted(int(v) for v, _, _ in results)
    assert versions == list(range(1, WRITERS + 1))  # unique and consecutive
    mvs = {int(m.version): m for m in client.search_model_versions(f"name='{NAME}'")}
    assert sorted(mvs) == versions
    for v, run_id, _ in results:  # each version points at its own writer's run
        assert mvs[int(v)].run_id == run_id == mvs[int(v)].tags["mlflow_run_id"]
    champion = int(client.get_model_version_by_alias(NAME, "champion").version)
    challenger = int(client.get_model_version_by_alias(NAME, "challenger").version)
    assert mvs[champion].tags["promotion"] == "promoted to champion"
    assert challenger in versions
    promoted = [v for v, m in mvs.items() if m.tags["promotion"] == "promoted to champion"]
    history = [int(v) for v in aliases.history(client, NAME)]
    assert champion in promoted and history and history[-1] == champion and set(history) <= set(promoted)
