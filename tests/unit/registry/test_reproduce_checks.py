"""The lineage checks of `qlora reproduce` (registry/rebuild.py) on their own: what each refusal and warning
says. The whole command runs in tests/system/test_sweep.py on a version a sweep registered."""

from __future__ import annotations

import json

import pytest

from qlora.config.schema import PipelineConfig
from qlora.errors import UserError
from qlora.refs import MlflowRun, QuantizedModel, TokenizedData
from registry.lineage import git_commit, library_versions
from registry.rebuild import Lineage, NotReproducible, check_base, check_data, environment_differences, read_lineage, rebased


def _lineage(tmp_path, config=None, report=None, **tags) -> Lineage:
    tags = {"base.fingerprint": "b1", "data.fingerprint": "d1", "git_commit": git_commit() or "unknown",
            "libraries": json.dumps(library_versions()), **tags}
    return Lineage(name="m", version="3", run=MlflowRun(tracking_uri="sqlite:///x.db", run_id="r"),
                   config=config or PipelineConfig(), tags=tags, cwd=str(tmp_path), data_report=report)


def test_same_environment_no_warning_else_one_per_difference(tmp_path):
    assert environment_differences(_lineage(tmp_path)) == []
    libs = library_versions() | {"torch": "0.0.1"}
    said = environment_differences(_lineage(tmp_path, git_commit="deadbeef", libraries=json.dumps(libs)))
    assert said[0].startswith("git commit differs: v3 was trained at deadbeef, this checkout is ")
    assert said[1] == f"torch differs: 0.0.1 at registration, {library_versions()['torch']} here"


def test_a_changed_base_is_refused_and_a_compute_dtype_difference_is_named(tmp_path):
    base = QuantizedModel(path="q", base="b", fingerprint="b1", footprint_bytes=1, compute_dtype="float32")
    check_base(_lineage(tmp_path), base)  # same fingerprint: nothing to say
    with pytest.raises(NotReproducible) as e:
        check_base(_lineage(tmp_path), base.model_copy(update={"fingerprint": "b2"}))
    assert "the base no longer matches v3's base.fingerprint (b1, now b2)" in str(e.value)
    assert "nothing was trained" in str(e.value) and "compute_dtype" not in str(e.value)
    lineage = _lineage(tmp_path, quantization=json.dumps({"bnb_4bit_compute_dtype": "bfloat16"}))
    with pytest.raises(NotReproducible, match="compute_dtype=auto resolves to float32 here but was bfloat16"):
        check_base(lineage, base.model_copy(update={"fingerprint": "b2"}))


def test_a_changed_mixture_source_is_named_by_its_bytes(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"text": "x"}\n')
    b.write_text('{"text": "y"}\n')
    cfg = PipelineConfig.model_validate({"data": {"sources": [{"path": str(a), "weight": 0.5}, {"path": str(b), "weight": 0.5}]}})
    import hashlib

    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    report = {"sources": [{"digest": digest(a)}, {"digest": digest(b)}]}
    b.write_text('{"text": "z"}\n')
    data = TokenizedData(path="t", fingerprint="d2", train_rows=1, eval_rows=1)
    with pytest.raises(NotReproducible) as e:
        check_data(_lineage(tmp_path, cfg, report), data, cfg)
    msg = str(e.value)
    assert f"data {a}, {b}: no longer matches v3's data.fingerprint (d1, now d2); changed: {b} sha256 " in msg
    assert str(a) + " sha256" not in msg


def test_relative_paths_are_read_where_the_version_was_trained(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.jsonl").write_text("{}\n")
    cfg = PipelineConfig.model_validate({"data": {"path": "data/x.jsonl"}, "model": {"name_or_path": "Org/hub-model"}})
    out = rebased(cfg, str(tmp_path))
    assert out.data.path == str(tmp_path / "data" / "x.jsonl")
    assert out.model.name_or_path == "Org/hub-model"  # not a local path there: a hub id stays


@pytest.mark.parametrize("uri", ["models:/m", "runs:/abc/model", "models:/m/latest"])
def test_only_registered_versions_can_be_reproduced(uri):
    with pytest.raises(UserError, match="expected models:/NAME/VERSION or models:/NAME@ALIAS"):
        read_lineage(uri, "sqlite:///unused.db")
