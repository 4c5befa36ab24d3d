"""Bad input, however malformed, is one message naming the key or file and what to do: exit status 1, no
Python traceback, no retry (issue 13, item 4). Each case goes through the real ``qlora`` entry point
(``flows.cli.main``) and, for ``run``, the real Prefect flow and tasks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import prefect.main  # noqa: F401  Prefect configures logging on import: bind its console handler now, not to a test's capture
import pytest

from flows.cli import main
from tests.conftest import DEMO_DATA, REPO

DEMO_YAML = str(REPO / "configs" / "demo.yaml")


def _rows(tmp_path, n=40):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(DEMO_DATA.read_text().splitlines(keepends=True)[:n]))
    return rows


def _one_clean_error(capsys, caplog, rc, *expected):
    """rc 1, one ``error:`` line holding ``expected``; no traceback and no retry in any log record."""
    out = capsys.readouterr()
    logs = caplog.text
    assert rc == 1, out.err[-3000:] + logs[-3000:]
    assert "Traceback" not in out.err + out.out + logs, (out.err + logs)[-3000:]
    assert "will start" not in logs and "Retrying" not in logs, logs[-3000:]  # a user error is never retried
    errors = [line for line in out.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out.err[-3000:]
    for text in expected:
        assert text in out.err, out.err[-3000:]
    caplog.clear()
    return out.err


def _model_cases(tmp_path, tiny_base):
    empty = tmp_path / "empty"
    empty.mkdir()
    not_model = tmp_path / "not-a-model"
    not_model.mkdir()
    (not_model / "notes.txt").write_text("weights are elsewhere")
    broken = tmp_path / "broken"  # config.json but no tokenizer files
    shutil.copytree(tiny_base, broken)
    for f in broken.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()
    return {
        "typo-path": ("./no/such/model", ["model.name_or_path", "'./no/such/model' does not exist"]),
        "empty-folder": (str(empty), ["model.name_or_path", "is an empty folder"]),
        "not-a-model-folder": (str(not_model), ["model.name_or_path", "not a Hugging Face model (no config.json"]),
        "model-without-tokenizer": (str(broken), ["model.name_or_path", "does not load as a model"]),
        "offline-hub-id": ("someorg/not-cached-model", ["model.name_or_path", "HF_HUB_OFFLINE=1", "hf download someorg/not-cached-model"]),
        "invalid-hub-id": ("bad id with spaces", ["model.name_or_path", "neither an existing local directory nor a valid hub id"]),
    }


CASES = ["typo-path", "empty-folder", "not-a-model-folder", "model-without-tokenizer", "offline-hub-id", "invalid-hub-id"]


@pytest.mark.parametrize("case", CASES)
def test_bad_model_fails_the_flow_once_with_one_line(prefect_server, tiny_base, tmp_path, mlflow_uri, capsys, caplog, case):
    name, expected = _model_cases(tmp_path, tiny_base)[case]
    rc = main(["run", DEMO_YAML, "--set", f"model.name_or_path={name}", "--set", f"data.path={_rows(tmp_path)}",
               "--set", f"workdir={tmp_path / 'work'}", "--set", f"tracking.artifact_location={tmp_path / 'art'}"])
    _one_clean_error(capsys, caplog, rc, *expected)


def test_missing_demo_base_says_how_to_build_it(prefect_server, tmp_path, mlflow_uri, capsys, caplog):
    """The default model.name_or_path is the demo base, which `make demo` builds: say so."""
    rc = main(["run", DEMO_YAML, "--set", f"data.path={_rows(tmp_path)}", "--set", f"workdir={tmp_path / 'work'}",
               "--set", f"tracking.artifact_location={tmp_path / 'art'}"])
    _one_clean_error(capsys, caplog, rc, "model.name_or_path", ".qlora/demo-base", "run `make demo` or `qlora build-demo` first")


@pytest.mark.parametrize("args, expected", [
    (["--set", "model.name_or_path="], ["model.name_or_path", "make demo"]),
    (["--set", "train.max_steps=[1,"], ["--set train.max_steps=[1,", "not valid YAML"]),
], ids=["empty-model", "unparseable-override"])
def test_bad_config_values_fail_at_load(tmp_path, capsys, caplog, args, expected):
    _one_clean_error(capsys, caplog, main(["validate-data", DEMO_YAML, *args]), *expected)


def test_unreadable_config_file(tmp_path, capsys, caplog):
    f = tmp_path / "binary.yaml"
    f.write_bytes(b"\xff\xfe\x00garbage")
    _one_clean_error(capsys, caplog, main(["validate-data", str(f)]), str(f), "cannot read the config file")


def test_malformed_data_files_never_print_a_traceback(tiny_base, tmp_path, capsys, caplog):
    """Hostile data: a device as data.path, a CSV field over the csv module's 131,072-character limit, JSON
    nested deeper than the parser's stack, a number too long to convert. Structure problems name the file;
    row problems are counted and dropped with their file:line."""
    good = "".join(json.dumps({"instruction": f"say {i}", "output": str(i)}) + "\n" for i in range(60))
    nested = tmp_path / "nested.jsonl"
    nested.write_text(good + "[" * 100_000 + "]" * 100_000 + "\n" + '{"instruction": "x", "output": ' + "9" * 5000 + "}\n")
    wide = tmp_path / "wide.csv"
    wide.write_text("instruction,output\n" + "".join(f"say {i},{i}\n" for i in range(20)) + "say more," + "word " * 40_000 + "\n")
    common = ["--set", f"model.name_or_path={tiny_base}", "--set", "data.max_length=64"]
    _one_clean_error(capsys, caplog, main(["validate-data", DEMO_YAML, "--set", "data.path=/dev/null", *common]),
                     "/dev/null: not a regular file")
    rc = main(["validate-data", DEMO_YAML, "--set", f"data.path={wide}", *common])
    out = capsys.readouterr()
    assert rc == 0 and "Traceback" not in out.err + out.out and "| truncated to max_length=64 | 1 |" in out.out, out.err[-2000:]
    rc = main(["validate-data", DEMO_YAML, "--set", f"data.path={nested}", "--set", "data.max_drop_fraction=0.1", *common])
    out = capsys.readouterr()
    assert rc == 0 and "Traceback" not in out.err + out.out, out.err[-2000:]
    assert f"{nested}:61: malformed JSON line" in out.out and f"{nested}:62: malformed JSON line" in out.out


def test_unreadable_files_as_a_user_without_root_powers(tiny_base, tmp_path):
    """Root reads anything, so these run with CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH dropped (setpriv):
    a data file, a save_to_disk dataset and a base model the process may not read."""
    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) not installed")
    from datasets import Dataset

    data = tmp_path / "locked.jsonl"
    data.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    saved = tmp_path / "saved"
    Dataset.from_list([{"instruction": "a", "output": "b"}] * 4).save_to_disk(str(saved))
    model = tmp_path / "model"
    shutil.copytree(tiny_base, model)
    for f in (data, *saved.glob("*.arrow"), model / "tokenizer.json", model / "tokenizer_config.json"):
        f.chmod(0)
    code = (
        "import sys\n"
        "from flows.cli import main\n"
        f"good = ['--set', 'model.name_or_path={tiny_base}', '--set', 'data.path={REPO / 'data/public/code_alpaca_2k.json'}']\n"
        f"for extra in (['--set', 'data.path={data}'], ['--set', 'data.path={saved}'], ['--set', 'model.name_or_path={model}']):\n"
        f"    print('RC', main(['validate-data', {DEMO_YAML!r}, *good, *extra]), flush=True)\n"
        "    print('---', file=sys.stderr, flush=True)\n"
    )
    drop = "-dac_override,-dac_read_search"
    proc = subprocess.run(["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}", sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.stdout.split().count("RC") == 3 and "RC 0" not in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    data_err, saved_err, model_err = proc.stderr.split("---")[:3]
    assert f"error: {data}: cannot read the data file (Permission denied)" in data_err
    assert "cannot read the dataset (permission denied)" in saved_err
    assert "error: model.name_or_path: cannot read" in model_err and "permission denied" in model_err


def test_predict_and_registry_commands_with_unknown_names(tmp_path, capsys, caplog, mlflow_store):
    uri = mlflow_store(tmp_path / "mlflow.db")
    _one_clean_error(capsys, caplog, main(["predict", "models:/nope@champion", "hi", "--tracking-uri", uri]),
                     "models:/nope@champion", "not found")
    _one_clean_error(capsys, caplog, main(["predict", "nope", "hi", "--tracking-uri", uri]), "error: nope:")
    _one_clean_error(capsys, caplog, main(["registry", "list", "nope", "--tracking-uri", uri]), "nope")
    _one_clean_error(capsys, caplog, main(["promote", "both'\"", "1", "--why", "x", "--tracking-uri", uri]), "not a registered model name")
