"""The serving bundle of a registered version and ``qlora serve-check``: the bundle the flow writes is accepted by a
server on the same base, revision and a large-enough rank, and refused (exit 1, naming what differs) otherwise."""

from __future__ import annotations

import json

import mlflow
import pytest
from safetensors.torch import load_file

from flows.cli import main as cli
from qlora.config.schema import RegistryConfig, TrackingConfig
from qlora.tracking.runs import start_run
from registry.bundle import BundleMismatch, serve_check
from registry.register import register_adapter
from tests.registry_fixtures import trained  # noqa: F401


def test_bundle_written_by_the_flow_and_checked(trained, prefect_server, mlflow_uri, tmp_path):
    base, adapter, report = trained
    run = start_run(TrackingConfig(uri=mlflow_uri, artifact_location=str(tmp_path / "art")), run_name="bundle")
    v = register_adapter(base, adapter, report, RegistryConfig(model_name="tiny-bundle", bootstrap_resamples=100), run)
    mlflow.MlflowClient(mlflow_uri).set_registered_model_alias("tiny-bundle", "champion", v.version)

    assert cli(["bundle", "models:/tiny-bundle@champion", str(tmp_path / "bundles" / "{name}-v{version}")]) == 0
    bundle = tmp_path / "bundles" / f"tiny-bundle-v{v.version}"
    m = json.loads((bundle / "manifest.json").read_text())
    tags = mlflow.MlflowClient(mlflow_uri).get_model_version("tiny-bundle", v.version).tags
    assert m["model"] == {"name": "tiny-bundle", "version": v.version, "uri": f"models:/tiny-bundle/{v.version}", "run_id": run.run_id}
    assert m["base"]["id"] == tags["base.name_or_path"] and m["base"]["revision"] == tags["base.fingerprint"]
    assert m["lora"]["rank"] == 8 and m["lora"]["target_modules"]
    assert m["prompt_template_sha256"] and len(m["prompt_template_sha256"]) == 64
    served = bundle / m["lora"]["path"]
    assert m["vllm"]["lora_modules"] == f"tiny-bundle-v{v.version}={served.resolve()}"
    # the adapter weights are the registered ones, byte for byte in value
    trained_w, bundled_w = load_file(f"{adapter.path}/adapter_model.safetensors"), load_file(served / "adapter_model.safetensors")
    assert trained_w.keys() == bundled_w.keys() and all((trained_w[k] == bundled_w[k]).all() for k in trained_w)
    assert json.loads((served / "adapter_config.json").read_text())["base_model_name_or_path"] == m["base"]["id"]

    rev = m["base"]["revision"]
    assert cli(["serve-check", str(bundle), "--base", m["base"]["id"], "--revision", rev, "--max-lora-rank", "16"]) == 0
    assert cli(["serve-check", str(bundle), "--base", "Qwen/Qwen2.5-7B-Instruct", "--revision", rev, "--max-lora-rank", "16"]) == 1
    assert cli(["serve-check", str(bundle), "--base", m["base"]["id"], "--revision", rev, "--max-lora-rank", "4"]) == 1
    assert serve_check(bundle, m["base"]["id"], 8, rev)["model"]["version"] == v.version
    with pytest.raises(BundleMismatch, match="base: the adapter was trained on .* the server runs 'Qwen/Qwen2.5-7B-Instruct'"):
        serve_check(bundle, "Qwen/Qwen2.5-7B-Instruct", 16, rev)
    with pytest.raises(BundleMismatch, match=r"above the server's --max-lora-rank 4 \(start vLLM with --max-lora-rank 8"):
        serve_check(bundle, m["base"]["id"], 4, rev)
    with pytest.raises(BundleMismatch, match="revision: the adapter was trained on .* the server runs 0000"):
        serve_check(bundle, m["base"]["id"], 16, revision="0000")
    with pytest.raises(BundleMismatch, match="pass the server's --revision"):
        serve_check(bundle, m["base"]["id"], 16)
    assert cli(["serve-check", str(tmp_path / "nothing"), "--base", "x", "--max-lora-rank", "8"]) == 1
    with pytest.raises(BundleMismatch.__mro__[1], match="no bundle manifest; write one with `qlora bundle"):
        serve_check(tmp_path / "nothing", "x", 8)
