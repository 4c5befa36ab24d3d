"""A full disk while a stage writes its output (issue 13, item 8): the partial ``<key>.tmp`` folder is
removed, the error names the path and says the disk is full, and nothing retries it.

A disk cannot be filled here, so the save call writes part of its output and then fails the way the
OS (or safetensors' Rust writer, or pyarrow) reports ENOSPC; everything around it is the real stage.
"""

from __future__ import annotations

import errno
import json

import prefect.main  # noqa: F401  Prefect configures logging on import: bind its console handler now, not to a test's capture
import pytest

from qlora.config.schema import DataConfig, ModelConfig, QuantizationConfig
from qlora.errors import UserError, is_transient
from tests.conftest import DEMO_DATA, REPO


def _os_enospc():
    return OSError(errno.ENOSPC, "No space left on device")


def _safetensors_enospc():
    from safetensors import SafetensorError

    return SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')


def _fills_up(real, error):
    """The real save, cut short: it writes some bytes into the target folder, then the disk is full."""

    def save(self, target, *a, **kw):
        from pathlib import Path

        Path(target).mkdir(parents=True, exist_ok=True)
        (Path(target) / "partial.bin").write_bytes(b"\0" * 4096)
        raise error()

    return save


def _entries(cache) -> list[str]:
    """What a cache folder holds besides its writer lock (``qlora.locks.one_writer``, taken by the task itself)."""
    return [p.name for p in cache.iterdir() if p.name != ".lock"]


@pytest.mark.parametrize("error", [_os_enospc, _safetensors_enospc], ids=["oserror", "safetensors"])
def test_quantize_disk_full_cleans_up_and_names_the_path(tiny_base, tmp_path, monkeypatch, error):
    from transformers import PreTrainedModel

    from tasks.quantize import prepare_quantized_model

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", _fills_up(PreTrainedModel.save_pretrained, error))
    with pytest.raises(UserError) as e:
        prepare_quantized_model(ModelConfig(name_or_path=str(tiny_base)), QuantizationConfig(), tmp_path)
    msg = str(e.value)
    assert "the disk is full" in msg and "quantized" in msg and ".tmp" in msg, msg
    assert not is_transient(e.value)  # retrying the same write into a full disk only wastes time
    assert _entries(tmp_path / "quantized") == []  # no partial <key>.tmp left behind
    monkeypatch.undo()  # space freed: the same call now completes
    ref = prepare_quantized_model(ModelConfig(name_or_path=str(tiny_base)), QuantizationConfig(), tmp_path)
    assert _entries(tmp_path / "quantized") == [ref.fingerprint]


def test_tokenize_disk_full_cleans_up_and_names_the_path(tiny_base, tmp_path, monkeypatch):
    from datasets import DatasetDict

    from tasks.tokenize import tokenize_dataset

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(DEMO_DATA.read_text().splitlines(keepends=True)[:50]))
    monkeypatch.setattr(DatasetDict, "save_to_disk", _fills_up(DatasetDict.save_to_disk, _os_enospc))
    with pytest.raises(UserError, match=r"tokenized/\w+\.tmp: the disk is full") as e:
        tokenize_dataset(DataConfig(path=str(rows), max_length=64), ModelConfig(name_or_path=str(tiny_base)), tmp_path)
    assert not is_transient(e.value)
    assert _entries(tmp_path / "tokenized") == []


def test_flow_with_a_full_disk_fails_once_with_one_line(prefect_server, tiny_base, tmp_path, mlflow_uri, monkeypatch, capsys, caplog):
    """Through the CLI entry and the real Prefect tasks: exit 1, the message, no traceback, no retry."""
    from transformers import PreTrainedModel

    from flows.cli import main

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(DEMO_DATA.read_text().splitlines(keepends=True)[:50]))
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", _fills_up(PreTrainedModel.save_pretrained, _os_enospc))
    rc = main(["run", str(REPO / "configs" / "demo.yaml"), "--set", f"model.name_or_path={tiny_base}", "--set", f"data.path={rows}",
               "--set", f"workdir={tmp_path / 'work'}", "--set", f"tracking.artifact_location={tmp_path / 'art'}"])
    out, logs = capsys.readouterr(), caplog.text
    assert rc == 1, out.err[-3000:]
    assert "the disk is full" in out.err and "Traceback" not in out.err + out.out + logs
    assert "will start" not in logs and "Retrying" not in logs  # not retried
    assert not list((tmp_path / "work" / "quantized").glob("*.tmp"))
    assert json.loads(next((tmp_path / "work" / "tokenized").glob("*/manifest.json")).read_text())["train_rows"] > 0
