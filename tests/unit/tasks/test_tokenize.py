"""Tokenize stage end to end on the real shared files: labels, split, cache, report."""

import json
import logging
from collections import Counter

import pytest
from datasets import load_from_disk

from qlora.config.schema import DataConfig, ModelConfig
from qlora.errors import DataError
from qlora.models import load_tokenizer
from qlora.template import format_prompt, user_message
from tasks.data.encode import IGNORE_INDEX
from tasks.tokenize import tokenize_dataset
from tests.conftest import DEMO_DATA, SHARED_DATA

# A Jinja chat template in the Hugging Face dialect, for the tokenizer-has-none fallback (data.chat_template).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def trained_spans(labels):
    """Maximal runs of trained (non -100) label ids."""
    spans, cur = [], []
    for t in labels:
        if t == IGNORE_INDEX:
            if cur:
                spans.append(cur)
            cur = []
        else:
            cur.append(t)
    return spans + ([cur] if cur else [])


def _tokenize(tmp_path, tiny_base, path, run=None, **kw):
    data = DataConfig(path=str(path), max_length=kw.pop("max_length", 2048), **kw)
    ref = tokenize_dataset(data, ModelConfig(name_or_path=str(tiny_base)), tmp_path / "work", run)
    return ref, load_from_disk(ref.path), load_tokenizer(ModelConfig(name_or_path=str(tiny_base)))


def test_alpaca_labels_are_exactly_the_response_plus_eos(tmp_path, tiny_base):
    path = SHARED_DATA / "code_alpaca_2k.json"
    ref, ds, tok = _tokenize(tmp_path, tiny_base, path)
    rows = json.loads(path.read_text())
    empty = [i for i, r in enumerate(rows, start=1) if not r["output"].strip()]
    assert empty == [238, 1860]  # two real rows with an empty answer: dropped, counted, logged
    assert ref.train_rows + ref.eval_rows == len(rows) - 2 == 2015
    report = json.loads((tmp_path / "work" / "tokenized" / ref.fingerprint / "report.json").read_text())
    assert report["dropped_by_reason"] == {"empty_field": 2}
    assert report["problem_lines"] == [f"{path}: item 238: empty field 'output'", f"{path}: item 1860: empty field 'output'"]
    by_prompt = {format_prompt(user_message(r["instruction"], r["input"])): r for r in rows}
    ev = ds["eval"]
    for i in range(len(ev)):
        ex = ev[i]
        row = by_prompt[ex["prompt"]]
        response_ids = tok(row["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert trained_spans(ex["labels"]) == [response_ids]
        # decoded: the answer + EOS (this tokenizer decodes a leading space: it prepends one when encoding)
        assert tok.decode(trained_spans(ex["labels"])[0]).lstrip() == row["output"] + tok.eos_token
        assert all(t == IGNORE_INDEX for t in ex["labels"][: -len(response_ids)])
        # the prompt part is exactly what inference feeds the model for this prompt
        assert ex["input_ids"][: -len(response_ids)] == tok(ex["prompt"])["input_ids"]


def test_sharegpt_trains_every_assistant_turn_and_nothing_else(tmp_path, tiny_base):
    path = SHARED_DATA / "sharegpt_dummy_conversation.json"
    ref, ds, tok = _tokenize(tmp_path, tiny_base, path)
    rows = json.loads(path.read_text())
    assert ref.train_rows + ref.eval_rows == len(rows) == 500
    # Every example's trained spans are exactly its source row's gpt turns + EOS: compare as multisets.
    expected = Counter(
        tuple(tuple(tok(t["value"].strip(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
              for t in r["conversations"] if t["from"] == "gpt")
        for r in rows
    )
    got = Counter(
        tuple(tuple(s) for s in trained_spans(labels)) for split in ("train", "eval") for labels in ds[split]["labels"]
    )
    assert got == expected
    assert sum(len(k) * c for k, c in expected.items()) > 500  # multi-turn rows are in there


def test_demo_split_and_cache_hit(tmp_path, tiny_base, caplog):
    ref1, ds, _ = _tokenize(tmp_path, tiny_base, DEMO_DATA, max_length=64, eval_fraction=0.1)
    assert ref1.eval_rows == round(0.1 * sum(1 for _ in open(DEMO_DATA)))
    assert set(ds["train"].column_names) == {"input_ids", "attention_mask", "labels"}
    with caplog.at_level("INFO", logger="qlora.tokenize"):
        ref2, _, _ = _tokenize(tmp_path, tiny_base, DEMO_DATA, max_length=64, eval_fraction=0.1)
    assert ref2 == ref1
    assert "cache hit" in caplog.text


def test_cache_key_is_content_not_names(tmp_path, tiny_base, caplog):
    rows = [{"instruction": f"say {i}", "output": str(i)} for i in range(30)]
    a = tmp_path / "a.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base, _, _ = _tokenize(tmp_path, tiny_base, a, max_length=64)
    renamed = tmp_path / "renamed.jsonl"
    renamed.write_bytes(a.read_bytes())
    with caplog.at_level("INFO", logger="qlora.tokenize"):
        same, _, _ = _tokenize(tmp_path, tiny_base, renamed, max_length=64)
    assert same.fingerprint == base.fingerprint and "cache hit" in caplog.text
    edited = tmp_path / "edited.jsonl"
    edited.write_text(a.read_text().replace('"say 3"', '"say three"'))
    keys = {
        "bytes": _tokenize(tmp_path, tiny_base, edited, max_length=64)[0].fingerprint,
        "max_length": _tokenize(tmp_path, tiny_base, a, max_length=32)[0].fingerprint,
        "format": _tokenize(tmp_path, tiny_base, a, max_length=64, format="alpaca")[0].fingerprint,
        "template": _tokenize(tmp_path, tiny_base, a, max_length=64, chat_template=CHAT_TEMPLATE)[0].fingerprint,
        "mapping": _tokenize(tmp_path, tiny_base, a, max_length=64, columns={"output": "answer"})[0].fingerprint,
    }
    assert base.fingerprint not in keys.values() and len(set(keys.values())) == len(keys)


def test_overlength_truncate_drop_error(tmp_path, tiny_base):
    path = SHARED_DATA / "code_alpaca_2k.json"
    ref, ds, _ = _tokenize(tmp_path, tiny_base, path, max_length=128, max_drop_fraction=0.5)
    assert ref.truncated_rows > 0
    assert max(len(x) for x in ds["train"]["input_ids"]) == 128
    report = json.loads((tmp_path / "work" / "tokenized" / ref.fingerprint / "report.json").read_text())
    # truncation never leaves a row without a trained token: those rows are dropped with their reason
    assert report["dropped_by_reason"]["prompt_too_long"] > 0
    assert all(any(t != IGNORE_INDEX for t in lab) for lab in ds["train"]["labels"])
    kept, _, _ = _tokenize(tmp_path, tiny_base, path, max_length=512, overlength="drop", max_drop_fraction=0.5)
    report = json.loads((tmp_path / "work" / "tokenized" / kept.fingerprint / "report.json").read_text())
    assert kept.truncated_rows == 0 and report["dropped_by_reason"]["too_long"] > 0
    assert kept.train_rows + kept.eval_rows == 2017 - 2 - report["dropped_by_reason"]["too_long"]
    with pytest.raises(DataError, match=r"item \d+: \d+ tokens is more than data.max_length=512 \(data.overlength=error\)"):
        _tokenize(tmp_path, tiny_base, path, max_length=512, overlength="error")


def test_report_reaches_mlflow_and_duplicates_overlap_are_counted(tmp_path, tiny_base, mlflow_uri, caplog):
    import mlflow

    from qlora.config.schema import TrackingConfig
    from qlora.tracking.runs import end_run, start_run

    rows = [{"instruction": f"say {i}", "output": str(i)} for i in range(20)]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows + rows[:3]))  # 3 exact duplicates
    ev = tmp_path / "eval.jsonl"
    ev.write_text("".join(json.dumps(r) + "\n" for r in rows[:2] + [{"instruction": "new", "output": "x"}]))
    run = start_run(TrackingConfig(), "t")
    mlflow_log = logging.getLogger("mlflow")  # mlflow's loggers do not propagate to the root, where caplog listens
    mlflow_log.addHandler(caplog.handler)
    try:
        ref, _, _ = _tokenize(tmp_path, tiny_base, train, run=run, max_length=64, eval_path=str(ev))
        _tokenize(tmp_path, tiny_base, train, run=run, max_length=64, eval_path=str(ev))  # cache hit logs again
    finally:
        mlflow_log.removeHandler(caplog.handler)
    end_run(run)
    client = mlflow.MlflowClient(mlflow_uri)
    m = client.get_run(run.run_id).data.metrics
    assert m["data/duplicate_rows"] == 5 and m["data/train_eval_overlap"] == 2
    assert m["data/train_rows"] == 23 and m["data/eval_rows"] == 3 and m["data/cache_hit"] == 1.0
    assert 0 < m["data/trainable_token_share"] < 1
    history = client.get_metric_history(run.run_id, "data/cache_hit")
    assert sorted(h.value for h in history) == [0.0, 1.0]
    report_md = mlflow.artifacts.load_text(f"runs:/{run.run_id}/data/report.md")
    assert "| exact duplicate rows | 5 |" in report_md and "⟦0⟧" in report_md
    # Both splits are run inputs; the train split (token ids only) without MLflow's schema warning, which
    # printed the whole attention_mask column into the log.
    inputs = {d.dataset.name: {t.key: t.value for t in d.tags} for d in client.get_run(run.run_id).inputs.dataset_inputs}
    assert inputs["train"]["mlflow.data.context"] == "training" and inputs["eval"]["mlflow.data.context"] == "evaluation"
    assert not [r for r in caplog.records if "Failed to infer schema" in r.getMessage()]


@pytest.mark.parametrize("chunk_rows, num_proc", [(10_000, 1), (7, 1), (10_000, 2)])
def test_arrow_columns_are_exactly_the_encoded_rows(tiny_base, monkeypatch, chunk_rows, num_proc):
    """The single-process path writes Arrow from numpy buffers (in chunks), the multi-process path runs
    ``Dataset.map``: both hold exactly what ``encode`` computes, row for row, with narrow int types."""
    import tasks.data.encode as T
    from tasks.data.parse import parse
    from tasks.data.read import read_source
    from tasks.data.render import render

    monkeypatch.setattr(T, "CHUNK_ROWS", chunk_rows)
    data = DataConfig(path=str(SHARED_DATA / "code_alpaca_2k.json"), max_length=128, num_proc=num_proc)
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_base)))
    items = render(parse(read_source(data.path), data), data, tok).items[:40]
    if num_proc > 1:  # below 2000 rows per worker the map would run in one process
        items = items * 100
    ds = T.tokenize_items(items, tok, data)
    want = T.encode(tok, [it.segments for it in items], data.max_length, data.overlength)
    assert len(ds) == len(items)
    for col in ("input_ids", "attention_mask", "labels", "problem", "n_tokens"):
        assert ds[col] == want[col], col
    assert str(ds.features["input_ids"].feature.dtype) == "int32" and str(ds.features["attention_mask"].feature.dtype) == "int8"
    # The sample includes rows cut at data.max_length, so the ragged offsets are exercised at the limit.
    assert max(want["n_tokens"]) > 128 and max(len(r) for r in ds["input_ids"]) == 128


@pytest.mark.parametrize("num_proc", [1, 2])
def test_tokenizing_inside_a_prefect_task_logs_no_bytecode(tiny_base, prefect_server, num_proc):
    """``datasets`` fingerprints a Dataset by pickling it with dill, and dill finds a function's globals
    by capturing ``dis.dis`` output; under a task's ``log_prints`` that output went to the run log
    (bytecode listings in every tokenize task's log). Tokenized datasets get their own fingerprint."""
    import logging

    from prefect import flow, task

    import tasks.data.encode as T
    from tasks.data.parse import parse
    from tasks.data.read import read_source
    from tasks.data.render import render

    data = DataConfig(path=str(SHARED_DATA / "code_alpaca_2k.json"), max_length=128, num_proc=num_proc)
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_base)))
    items = render(parse(read_source(data.path), data), data, tok).items[:40] * (100 if num_proc > 1 else 1)

    @task(log_prints=True)
    def tokenize_in_task():
        print("a print from inside the task")  # the capture works: this one must arrive
        return len(T.tokenize_items(items, tok, data))

    @flow(log_prints=True)
    def tokenize_in_flow():
        return tokenize_in_task()

    class Keep(logging.Handler):
        lines: list[str] = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    keep, logger = Keep(), logging.getLogger("prefect.task_runs")
    logger.addHandler(keep)
    try:
        assert tokenize_in_flow() == len(items)
    finally:
        logger.removeHandler(keep)
    assert "a print from inside the task" in keep.lines
    assert not [line for line in keep.lines if "LOAD_" in line or "RESUME" in line], keep.lines[:5]
