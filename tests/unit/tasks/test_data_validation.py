"""Validation: a corpus of broken files, each failing with its exact line; every source type; the CLI."""

import json

import pytest

from flows.cli import main
from qlora.config.schema import DataConfig, ModelConfig
from qlora.errors import DataError
from qlora.models import load_tokenizer
from tasks.data.pipeline import prepare_data

GOOD = '{"instruction": "say hi", "output": "hi"}\n'


@pytest.fixture(scope="module")
def tok(tiny_base):
    return load_tokenizer(ModelConfig(name_or_path=str(tiny_base)))


def _prepare(tok, path, **kw):
    return prepare_data(DataConfig(path=str(path), max_length=kw.pop("max_length", 64), **kw), tok)


# (file name, bytes, the exact line expected in the error; {p} is the file's path)
BROKEN = [
    ("empty.jsonl", b"", "{p}: file is empty; expected rows of training data"),
    ("blank.jsonl", b"\n  \n", "{p}: file is empty; expected rows of training data"),
    ("bad_line.jsonl", (GOOD + '{"instruction": "a", oops}\n').encode(),
     "{p}:2: malformed JSON line: Expecting property name enclosed in double quotes (column 22)"),
    ("array.jsonl", b'[{"instruction": "a", "output": "b"}]\n', "{p}:1: a JSON array in a JSON Lines file; write one object per line or rename the file to .json"),
    ("lines_of_arrays.json", b'[{"instruction": "a", "output": "b"}]\n[{"instruction": "c", "output": "d"}]\n',
     "{p}:2: more data after the JSON array ended; if this is JSON Lines (one row per line), the first line must be an object, not an array"),
    ("bad_array.json", b'[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}]',
     "{p}:2: malformed JSON array: Expecting ',' delimiter (column 22)"),
    ("not_object.jsonl", (GOOD + "[1, 2]\n").encode(), "{p}:2: expected a JSON object, got list"),
    ("missing.jsonl", (GOOD + '{"instruction": "a"}\n').encode(), "{p}:2: missing field 'output'"),
    ("empty_field.json", b'[{"instruction": "a", "output": "b"}, {"instruction": " ", "output": "b"}]', "{p}: item 2: empty field 'instruction'"),
    ("not_string.jsonl", (GOOD + '{"instruction": "a", "output": 3}\n').encode(), "{p}:2: field 'output' must be a string, got int"),
    ("bad_utf8.jsonl", GOOD.encode() + b'{"instruction": "caf\xe9", "output": "b"}\n', "{p}:2: invalid UTF-8 at byte 21 of the line; save the file as UTF-8"),
    ("order.jsonl", b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
     b'{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}\n',
     "{p}:2: messages[0] is a 'assistant' turn where a 'user' turn was expected"),
    ("no_answer.jsonl", b'{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}\n'
     b'{"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "a"}]}\n',
     "{p}:2: 'conversations' has no assistant turn to train on"),
    ("bad_role.jsonl", b'{"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]}\n',
     "{p}:1: conversations[1].from is 'bot'; expected one of ['assistant', 'gpt', 'human', 'system', 'user']"),
    ("content_list.jsonl", b'{"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "b"}]}\n',
     "{p}:1: messages[0].content must be a string, got list"),
    ("long_prompt.jsonl", (GOOD + json.dumps({"instruction": "word " * 200, "output": "b"}) + "\n").encode(),
     "{p}:2: the prompt alone is 411 tokens and fills data.max_length=64; no token left to train on"),
    ("all_bad.csv", b"instruction,output\na,\nb,\n", "{p}:3: empty field 'output'"),
    ("ragged.csv", b"instruction,output\na,b\nc,d,e\n", "{p}:3: more fields than the header has columns"),
    ("unknown.jsonl", b'{"question": "a", "answer": "b"}\n',
     "{p}:1: cannot tell the format from keys ['answer', 'question']; expected alpaca (instruction, input, output), "
     "sharegpt (conversations), messages, prompt_completion (prompt, completion) or text. Set data.format, and "
     "data.columns to map differently named fields"),
]


@pytest.mark.parametrize("name, content, line", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_file_names_file_line_and_reason(tmp_path, tok, name, content, line):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(DataError) as e:
        _prepare(tok, p, max_drop_fraction=0.0)
    assert line.format(p=p) in str(e.value).splitlines()


def test_every_row_dropped_and_drop_share(tmp_path, tok):
    p = tmp_path / "all_bad.jsonl"
    p.write_text('{"instruction": "a", "output": ""}\n{"instruction": "b", "output": ""}\n')
    with pytest.raises(DataError) as e:
        _prepare(tok, p, max_drop_fraction=1.0)
    assert str(e.value).splitlines() == [f"{p}:1: empty field 'output'", f"{p}:2: empty field 'output'", f"{p}: all 2 rows dropped; nothing to train on"]
    q = tmp_path / "mostly_good.jsonl"
    q.write_text("".join(json.dumps({"instruction": f"say {i}", "output": str(i)}) + "\n" for i in range(40)) + '{"instruction": "x"}\n')
    prep = _prepare(tok, q, max_drop_fraction=0.05)  # 1 of 41 is under 5%: dropped and counted
    assert prep.report.dropped_by_reason == {"missing_field": 1}
    assert prep.report.problem_lines == [f"{q}:41: missing field 'output'"]
    with pytest.raises(DataError, match=r"1 of 41 rows unusable, more than data.max_drop_fraction=0.0; fix the rows above"):
        _prepare(tok, q, max_drop_fraction=0.0)


def test_explicit_format_that_does_not_match_says_what_the_rows_look_like(tok):
    from tests.conftest import SHARED_DATA

    with pytest.raises(DataError) as e:
        prepare_data(DataConfig(path=str(SHARED_DATA / "sharegpt_dummy_conversation.json"), format="alpaca"), tok)
    assert str(e.value).splitlines()[-1] == (
        f"{SHARED_DATA / 'sharegpt_dummy_conversation.json'}: all 500 rows dropped; nothing to train on "
        "(data.format is alpaca, but the rows look like sharegpt: set data.format=sharegpt or auto)"
    )


def test_bom_is_accepted_and_missing_file_is_a_data_error(tmp_path, tok):
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + (GOOD * 3).encode())
    assert _prepare(tok, p).report.rows_read == 3
    with pytest.raises(DataError, match="data file not found"):
        _prepare(tok, tmp_path / "nope.jsonl")


def _rows(n=12):
    return [{"question": f"say {i}", "answer": str(i)} for i in range(n)]


def test_sources_csv_parquet_saved_dir_and_json_lines_in_json(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset, DatasetDict

    rows = _rows()
    cols = {"instruction": "question", "output": "answer"}
    csv = tmp_path / "d.csv"
    csv.write_text("question,answer\n" + "".join(f"{r['question']},{r['answer']}\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    DatasetDict({"train": Dataset.from_list(rows), "test": Dataset.from_list(rows[:2])}).save_to_disk(str(tmp_path / "saved"))
    jl = tmp_path / "lines.json"
    jl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = {}
    for src in (csv, tmp_path / "d.parquet", tmp_path / "saved", jl):
        prep = _prepare(tok, src, columns=cols, eval_fraction=0.25)
        results[src.name] = (prep.report.format, len(prep.train) + len(prep.eval), tuple(sorted(prep.eval["reference"])))
    assert len(set(results.values())) == 1, results  # the same rows whichever container they came in
    assert results["d.csv"][:2] == ("alpaca", 12)
    assert len(_prepare(tok, tmp_path / "saved", columns=cols, split="test").eval) == 1
    with pytest.raises(DataError, match=r"saved: no split 'validation' \(has \['test', 'train'\]\); set data.split"):
        _prepare(tok, tmp_path / "saved", columns=cols, split="validation")


def test_hub_dataset_id_uses_load_dataset_and_fails_clearly_offline(tok, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match=r"^someone/some-dataset: cannot load hub dataset \(split=train, subset=None, revision=v1\)"):
        prepare_data(DataConfig(path="someone/some-dataset", revision="v1"), tok)


def test_validate_data_cli_prints_report_or_one_line_per_problem(tmp_path, tiny_base, capsys):
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"instruction": f"say {i}", "output": str(i)}) + "\n" for i in range(20)))
    common = ["--set", f"model.name_or_path={tiny_base}", "--set", "data.max_length=64"]
    assert main(["validate-data", "configs/demo.yaml", "--set", f"data.path={good}", *common]) == 0
    out = capsys.readouterr().out
    assert f"# Data report: {good}" in out and "18 train / 2 eval" in out and "⟦" in out
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text() + '{"instruction": 1, "output": "x"}\nnot json\n')
    assert main(["validate-data", "configs/demo.yaml", "--set", f"data.path={bad}", *common]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"error: {bad}:21: field 'instruction' must be a string, got int",
        f"{bad}:22: malformed JSON line: Expecting value (column 1)",
        f"{bad}: 2 of 22 rows unusable, more than data.max_drop_fraction=0.05; fix the rows above or raise data.max_drop_fraction",
    ]
    assert "Traceback" not in err
