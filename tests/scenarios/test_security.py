"""Security review findings (issue 13, item 11): webhook URLs (credentials in their path) stay out of configs,
flow parameters and logs (notifications are Prefect blocks on the server now; an old config's URL is refused without
being echoed), trust_remote_code is announced before the first load, and ``qlora predict`` refuses a registered
version that would run shipped code or unpickle weights."""

from __future__ import annotations

import logging

import prefect.main  # noqa: F401  Prefect configures logging on import: bind its console handler now, not to a test's capture
import pytest
import yaml

from flows.cli import main
from qlora.config.files import load_config
from qlora.config.schema import DataConfig, ModelConfig
from qlora.errors import ConfigError
from tests.conftest import DEMO_DATA

TOKEN = "T0000/B0000/XXXXsecretXXXX"


def test_an_old_configs_webhook_url_is_refused_without_echoing_it(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump({"report": {"webhook_url": f"https://hooks.example.com/{TOKEN}"}}))
    with pytest.raises(ConfigError) as e:
        load_config(old)
    assert str(e.value).startswith(f"{old}: report.webhook_url: removed: notifications are Prefect automations")
    assert "qlora notifications setup --block" in str(e.value) and TOKEN not in str(e.value)


def test_trust_remote_code_is_announced_before_the_first_load(tiny_base, tmp_path, monkeypatch):
    """The tokenizer is the first thing loaded (stage 1): the warning must come before it, not in quantize."""
    from transformers import AutoConfig, AutoTokenizer

    from tasks.tokenize import tokenize_dataset

    events = []

    class Record(logging.Handler):
        def emit(self, record):
            if "trust_remote_code" in record.getMessage():
                events.append("warning")

    for cls in (AutoTokenizer, AutoConfig):  # pass-through spies: the real loads still happen
        real = cls.from_pretrained.__func__
        monkeypatch.setattr(cls, "from_pretrained", classmethod(lambda c, *a, _real=real, **kw: (events.append("load"), _real(c, *a, **kw))[1]))
    handler = Record()
    logging.getLogger("qlora").addHandler(handler)
    try:
        rows = tmp_path / "rows.jsonl"
        rows.write_text("".join(DEMO_DATA.read_text().splitlines(keepends=True)[:40]))
        tokenize_dataset(DataConfig(path=str(rows), max_length=64), ModelConfig(name_or_path=str(tiny_base), trust_remote_code=True), tmp_path)
    finally:
        logging.getLogger("qlora").removeHandler(handler)
    assert events and events[0] == "warning", events
    assert events.count("warning") == 1


def _fake_version(client, root, name: str, cls: str, files: list[str], pyfunc: dict | None = None) -> None:
    """A registered version whose MLmodel says what a hostile registry writer could say."""
    src = root / name
    src.mkdir()
    (src / "MLmodel").write_text(yaml.safe_dump({
        "artifact_path": "model", "mlflow_version": "3.17.2", "model_uuid": name, "utc_time_created": "2026-01-01 00:00:00",
        "flavors": {"transformers": {"pipeline_model_type": cls, "task": "text-generation", "components": ["tokenizer"],
                                     "tokenizer_type": "PreTrainedTokenizerFast", "framework": "pt"},
                    "python_function": pyfunc or {"loader_module": "mlflow.transformers", "python_version": "3.11"}},
    }))
    for f in files:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        (src / f).write_bytes(b"not really weights")
    client.create_registered_model(name)
    client.create_model_version(name, source=str(src))


def test_predict_refuses_versions_that_would_run_code_or_unpickle(tmp_path, capsys, mlflow_store):
    import mlflow

    uri = mlflow_store(tmp_path / "mlflow.db")
    client = mlflow.MlflowClient(uri)
    _fake_version(client, tmp_path, "custom-arch", "EvilForCausalLM", ["model/config.json", "model/modeling_evil.py"])
    _fake_version(client, tmp_path, "pickled", "LlamaForCausalLM", ["model/config.json", "model/pytorch_model.bin"])
    assert main(["predict", "models:/custom-arch/1", "hi", "--tracking-uri", uri]) == 1
    err = capsys.readouterr().err
    assert "EvilForCausalLM is not a transformers class" in err and "trust_remote_code=True" in err and "Traceback" not in err
    assert main(["predict", "models:/pickled/1", "hi", "--tracking-uri", uri]) == 1
    err = capsys.readouterr().err
    assert "model/pytorch_model.bin" in err and "safetensors only" in err and "Traceback" not in err


def test_predict_refuses_a_pyfunc_loader_it_does_not_know(tmp_path, capsys, mlflow_store):
    """A chat version's pyfunc loader is registry.chat (a module name the registry writer chooses): any other
    loader, or code shipped for the loader to import, is refused before anything is imported."""
    import mlflow

    uri = mlflow_store(tmp_path / "mlflow.db")
    client = mlflow.MlflowClient(uri)
    _fake_version(client, tmp_path, "other-loader", "LlamaForCausalLM", ["model/config.json"],
                  {"loader_module": "evil_loader", "python_version": "3.11"})
    _fake_version(client, tmp_path, "shipped-code", "LlamaForCausalLM", ["model/config.json", "code/registry/chat.py"],
                  {"loader_module": "registry.chat", "code": "code", "python_version": "3.11"})
    assert main(["predict", "models:/other-loader/1", "hi", "--tracking-uri", uri]) == 1
    err = capsys.readouterr().err
    assert "its pyfunc loader is 'evil_loader'" in err and "Traceback" not in err
    assert main(["predict", "models:/shipped-code/1", "hi", "--tracking-uri", uri]) == 1
    assert "with code shipped in the artifact (code)" in capsys.readouterr().err
