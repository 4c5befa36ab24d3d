"""Dataset mixtures (data.sources): two real public files in different formats, mixed by weight, with every
source's counts in the data report, the cache key covering every source, and bad mixtures refused at load."""

from __future__ import annotations

import json
import logging
import random

import mlflow
import pytest

from qlora.config.files import load_config
from qlora.config.schema import DataConfig, ModelConfig
from qlora.errors import ConfigError
from tasks.data.split import draw, shares
from tests.conftest import REPO, SHARED_DATA, qlora

ALPACA, SHAREGPT = SHARED_DATA / "code_alpaca_2k.json", SHARED_DATA / "sharegpt_dummy_conversation.json"


def _mix(alpaca=ALPACA, sharegpt=SHAREGPT, w=0.75, **extra) -> DataConfig:
    return DataConfig(sources=[{"path": str(alpaca), "weight": w, "format": "alpaca"},
                               {"path": str(sharegpt), "weight": round(1 - w, 6)}],
                      max_length=256, max_drop_fraction=0.2, eval_fraction=0.1, **extra)


def test_largest_remainder_shares_add_up_and_draws_repeat_only_when_asked():
    assert shares([0.75, 0.25], 2253) == [1690, 563]
    assert sum(shares([1 / 3, 1 / 3, 1 / 3], 100)) == 100
    rows = list(range(10))
    sub, rep = draw(rows, 4, random.Random(0))
    assert len(set(sub)) == 4 and rep == 0  # without replacement
    up, rep = draw(rows, 25, random.Random(0))
    assert len(up) == 25 and rep == 15 and set(up) == set(rows)  # every row once, then 15 draws


def test_two_source_mixture_report_counts_and_cache_key(tiny_base, tmp_path, mlflow_uri, caplog):
    from qlora.config.schema import TrackingConfig
    from qlora.tracking.runs import start_run
    from tasks.tokenize import tokenize_dataset

    model = ModelConfig(name_or_path=str(tiny_base))
    run = start_run(TrackingConfig(artifact_location=str(tmp_path / "art")), "mix")
    data = _mix()
    ref = tokenize_dataset(data, model, tmp_path / "w", run)
    report = json.loads((tmp_path / "w" / "tokenized" / ref.fingerprint / "report.json").read_text())
    alpaca, sharegpt = report["sources"]
    assert (alpaca["format"], alpaca["weight"], sharegpt["format"], sharegpt["weight"]) == ("alpaca", 0.75, "sharegpt", 0.25)
    assert alpaca["rows_read"] == 2017 and sharegpt["rows_read"] == 500
    assert alpaca["rows_dropped"] > 0 and sharegpt["rows_dropped"] == 0  # code alpaca has empty outputs / long prompts
    total = alpaca["train_rows_available"] + sharegpt["train_rows_available"]
    assert alpaca["rows_used"] + sharegpt["rows_used"] == total == ref.train_rows  # the mixture keeps the total
    assert abs(alpaca["rows_used"] - 0.75 * total) <= 1 and abs(sharegpt["rows_used"] - 0.25 * total) <= 1
    # 450 usable sharegpt rows cannot fill a quarter of ~2250: every row once, the rest drawn again
    assert sharegpt["repeated_rows"] == sharegpt["rows_used"] - sharegpt["train_rows_available"] > 0
    assert alpaca["repeated_rows"] == 0 and alpaca["rows_used"] < alpaca["train_rows_available"]
    assert ref.eval_rows == alpaca["eval_rows"] + sharegpt["eval_rows"] and sharegpt["eval_rows"] == 50
    md = (tmp_path / "w" / "tokenized" / ref.fingerprint / "report.md").read_text()
    assert "## Sources (mixed by weight)" in md
    assert f"| 0 | {ALPACA} | alpaca | 0.75 | 0.750 |" in md and f"| 1 | {SHAREGPT} | sharegpt | 0.25 | 0.250 |" in md

    # Same numbers in the MLflow run, one metric family per source.
    m = mlflow.MlflowClient(mlflow_uri).get_run(run.run_id).data.metrics
    assert m["data/source/0/weight"] == 0.75 and m["data/source/1/weight"] == 0.25
    assert m["data/source/1/rows_used"] == sharegpt["rows_used"] and m["data/source/0/rows_dropped"] == alpaca["rows_dropped"]

    # The eval split interleaves the sources (evaluation reads its first rows).
    from datasets import load_from_disk

    first = load_from_disk(ref.path)["eval"]["prompt"][:20]
    asked = {r["conversations"][0]["value"].strip()[:40] for r in json.loads(SHAREGPT.read_text())}
    from_sharegpt = [any(q in p for q in asked) for p in first]
    assert any(from_sharegpt) and not all(from_sharegpt)

    # Same files and weights: a cache hit. Another weight, or one changed row in one source: another key.
    with caplog.at_level(logging.INFO, logger="qlora.tokenize"):
        again = tokenize_dataset(_mix(), model, tmp_path / "w")
    assert again.fingerprint == ref.fingerprint and "tokenized data cache hit" in caplog.text
    assert tokenize_dataset(_mix(w=0.5), model, tmp_path / "w").fingerprint != ref.fingerprint
    rows = json.loads(SHAREGPT.read_text())
    rows[0]["conversations"][1]["value"] += " (edited)"
    edited = tmp_path / "sharegpt_edited.json"
    edited.write_text(json.dumps(rows))
    assert tokenize_dataset(_mix(sharegpt=edited), model, tmp_path / "w").fingerprint != ref.fingerprint


def test_the_mixture_is_the_same_every_time(tiny_base):
    from qlora.models import load_tokenizer
    from tasks.data.pipeline import prepare_data

    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_base)))
    a, b = prepare_data(_mix(), tok), prepare_data(_mix(), tok)
    assert a.train["input_ids"] == b.train["input_ids"] and a.eval["input_ids"] == b.eval["input_ids"]
    c = prepare_data(_mix(seed=7), tok)
    assert c.train["input_ids"] != a.train["input_ids"]  # data.seed drives the draws


@pytest.mark.parametrize("overrides, says", [
    (["data.path=x.jsonl", "data.sources=[{path: a.json, weight: 1}]"], "data: Value error, set either data.path or data.sources, not both"),
    (["data.sources=[{path: a.json, weight: 0.6}, {path: b.json, weight: 0.3}]"], "data.sources weights add up to 0.9 (0.6 + 0.3)"),
    (["data.sources=[{path: a.json, weight: 0.5}, {path: b.json, wieght: 0.5}]"], "data.sources.1.wieght: unknown key"),
    (["data.sources=[{path: a.json, weight: 0}, {path: b.json, weight: 1}]"], "data.sources.0.weight: Input should be greater than 0"),
    (["data.path=null"], "set data.path (one dataset) or data.sources (a mixture)"),
])
def test_bad_mixtures_are_refused_at_load_naming_the_key(overrides, says):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert says in str(e.value)


def test_cli_validate_data_prints_both_sources_or_one_error_line(tiny_base, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    sources = f"data.sources=[{{path: {ALPACA}, weight: 0.5}}, {{path: {SHAREGPT}, weight: 0.5}}]"
    cmd = ["validate-data", str(REPO / "configs" / "demo.yaml"), "--set", "data.path=null",
           "--set", "data.max_length=256", "--set", "data.max_drop_fraction=0.2", "--set", f"model.name_or_path={tiny_base}", "--set"]
    code, out, err = qlora(capfd, *cmd, sources)
    assert code == 0, err[-3000:]
    assert f"| 0 | {ALPACA} | alpaca | 0.5 |" in out and f"| 1 | {SHAREGPT} | sharegpt | 0.5 |" in out
    code, _, err = qlora(capfd, *cmd, sources.replace("0.5}]", "0.4}]"))
    assert code == 1
    assert "data.sources weights add up to 0.9 (0.5 + 0.4)" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # validation writes nothing
