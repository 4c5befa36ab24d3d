"""Batch prediction through the registry: the flow resolves ``@champion`` once, writes one prediction per row with
the version that made it and an MLflow run linked to it; a killed run (whole batches plus one torn line) resumes
at the first missing row; the three input formats read the same prompts; bad input names the file."""

from __future__ import annotations

import json
import logging

import mlflow
import pytest

from flows.cli import main as cli
from qlora.config.schema import RegistryConfig, TrackingConfig
from qlora.errors import DataError, UserError
from qlora.tracking.runs import start_run
from registry import batch
from registry.consumer import generation_params, predict
from registry.register import register_adapter
from tests.registry_fixtures import trained  # noqa: F401

NAME = "tiny-batch"
PROMPTS = [f"Reverse the order of these words: {w}" for w in
           ("apple river stone", "tiger lemon castle", "cloud paper glass", "north violin bread", "green hammer sky")]


@pytest.fixture
def champion(trained, mlflow_uri, tmp_path):
    base, adapter, report = trained
    run = start_run(TrackingConfig(uri=mlflow_uri, artifact_location=str(tmp_path / "art")), run_name="batch")
    v = register_adapter(base, adapter, report, RegistryConfig(model_name=NAME, bootstrap_resamples=100), run)
    mlflow.MlflowClient(mlflow_uri).set_registered_model_alias(NAME, "champion", v.version)
    return v.version


def test_read_prompts_from_each_format(tmp_path):
    import pandas as pd

    frame = pd.DataFrame({"id": range(len(PROMPTS)), "prompt": PROMPTS})
    frame.to_csv(tmp_path / "p.csv", index=False)
    frame.to_parquet(tmp_path / "p.parquet")
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"message": p}) + "\n" for p in PROMPTS))
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    for f in ("p.csv", "p.parquet", "p.jsonl", "s.jsonl"):
        assert batch.read_prompts(tmp_path / f) == PROMPTS, f
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not JSON"):
        batch.read_prompts(tmp_path / "bad.jsonl")
    pd.DataFrame({"a": ["x"], "b": ["y"]}).to_csv(tmp_path / "cols.csv", index=False)
    with pytest.raises(DataError, match=r"cols.csv: no prompt column among \['a', 'b'\]"):
        batch.read_prompts(tmp_path / "cols.csv")
    with pytest.raises(DataError, match="unsupported batch input .txt"):
        (tmp_path / "p.txt").write_text("x")
        batch.read_prompts(tmp_path / "p.txt")


def test_batch_predict_flow_and_resume(champion, prefect_server, mlflow_uri, tmp_path):
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    out = tmp_path / "out" / "{name}-v{version}.jsonl"
    assert cli(["batch-predict", f"models:/{NAME}@champion", str(src), str(out), "--batch-size", "2",
                "--max-new-tokens", "5"]) == 0
    written = tmp_path / "out" / f"{NAME}-v{champion}.jsonl"
    rows = [json.loads(line) for line in written.read_text().splitlines()]
    assert [r["row"] for r in rows] == list(range(len(PROMPTS))) and [r["prompt"] for r in rows] == PROMPTS
    assert {(r["model"], r["version"]) for r in rows} == {(NAME, champion)}
    # the same version, called as any consumer calls it, says the same
    assert [r["prediction"] for r in rows] == predict(f"models:/{NAME}/{champion}", PROMPTS, max_new_tokens=5)

    client = mlflow.MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("qlora-batch-predict").experiment_id])
    assert run.data.tags["qlora.model_uri"] == f"models:/{NAME}/{champion}"
    assert run.data.metrics["rows"] == len(PROMPTS) and run.data.metrics["rows_generated"] == len(PROMPTS)
    mv = client.get_model_version(NAME, champion)
    if mv.model_id:  # MLflow 3: the batch's metrics are on the version's logged model
        assert {m.key for m in mlflow.get_logged_model(mv.model_id).metrics} >= {"rows", "rows_generated"}

    # A run killed in its third batch: two whole batches and half a line on disk. Running again generates the rest only.
    full = written.read_text()
    lines = full.splitlines(keepends=True)
    written.write_text("".join(lines[:4]) + lines[4][:10])
    seen = []  # Prefect's logging setup (extra logger "qlora") stops propagation to caplog: listen on the logger
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("qlora.batch").addHandler(handler)
    logging.getLogger("qlora.batch").setLevel(logging.INFO)
    params = generation_params(max_new_tokens=5)
    result = batch.predict_file(f"models:/{NAME}/{champion}", PROMPTS, written, 2, params, mlflow_uri)
    assert (result.rows, result.generated) == (5, 1)
    logging.getLogger("qlora.batch").removeHandler(handler)
    assert any("resuming at row 4" in m for m in seen) and any("torn last line" in m for m in seen), seen
    assert written.read_text() == full

    with pytest.raises(UserError, match=r"made by tiny-batch v.*not tiny-batch v99"):
        batch.done_rows(written, PROMPTS, NAME, "99")
    with pytest.raises(UserError, match="the input changed"):
        batch.done_rows(written, list(reversed(PROMPTS)), NAME, champion)
    assert cli(["batch-predict", f"models:/{NAME}@nosuchalias", str(src), str(tmp_path / "x.jsonl")]) == 1
