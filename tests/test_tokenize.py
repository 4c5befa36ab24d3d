import json

import pytest
from datasets import load_from_disk

from qlora.config import DataConfig, ModelConfig
from qlora.errors import DataError
from qlora.template import format_prompt, user_message
from tasks.tokenize import IGNORE_INDEX, load_tokenizer, read_rows, segments, tokenize_dataset

from .conftest import DEMO_DATA, SHARED_DATA


def _trained_spans(labels):
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


def _tokenize(tmp_path, tiny_base, path, **kw):
    data = DataConfig(path=str(path), max_length=kw.pop("max_length", 2048), **kw)
    ref = tokenize_dataset(data, ModelConfig(name_or_path=str(tiny_base)), tmp_path / "work")
    return ref, load_from_disk(ref.path), load_tokenizer(ModelConfig(name_or_path=str(tiny_base)))


def test_alpaca_labels_are_exactly_the_response_plus_eos(tmp_path, tiny_base):
    path = SHARED_DATA / "code_alpaca_2k.json"
    ref, ds, tok = _tokenize(tmp_path, tiny_base, path)
    rows = json.loads(path.read_text())
    empty = [i for i, r in enumerate(rows, start=1) if not r["output"].strip()]
    assert empty == [238, 1860]  # two real rows with an empty answer: dropped, counted, logged
    assert ref.train_rows + ref.eval_rows == len(rows) - 2 == 2015
    by_prompt = {format_prompt(user_message(r["instruction"], r["input"])): r for r in rows}
    ev = ds["eval"]
    for i in range(len(ev)):
        ex = ev[i]
        row = by_prompt[ex["prompt"]]
        response_ids = tok(row["output"].strip(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert _trained_spans(ex["labels"]) == [response_ids]
        # prompt tokens are masked, and the trained tokens are the tail of the input
        assert ex["input_ids"][-len(response_ids):] == response_ids
        assert all(t == IGNORE_INDEX for t in ex["labels"][: -len(response_ids)])
        # the prompt part is exactly what inference feeds the model for this prompt
        assert ex["input_ids"][: -len(response_ids)] == tok(ex["prompt"])["input_ids"]


def test_sharegpt_trains_every_assistant_turn_and_nothing_else(tmp_path, tiny_base):
    path = SHARED_DATA / "sharegpt_dummy_conversation.json"
    ref, ds, tok = _tokenize(tmp_path, tiny_base, path)
    assert ref.train_rows + ref.eval_rows == 500
    rows = {r["id"]: r for r in json.loads(path.read_text())}
    # Re-derive each training example's expected assistant spans from its source row.
    checked = 0
    for r in list(rows.values())[:50]:
        segs = segments(dict(r, _where="x"), "sharegpt")
        expected = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t, trained in segs if trained]
        assert len(expected) == sum(1 for t in r["conversations"] if t["from"] == "gpt")
        checked += 1
    assert checked == 50
    for ex in ds["train"].select(range(50)):
        spans = _trained_spans(ex["labels"])
        assert spans and all(s[-1] == tok.eos_token_id for s in spans)


def test_demo_split_and_cache_hit(tmp_path, tiny_base, caplog):
    ref1, ds, _ = _tokenize(tmp_path, tiny_base, DEMO_DATA, max_length=64, eval_fraction=0.1)
    assert ref1.eval_rows == round(0.1 * sum(1 for _ in open(DEMO_DATA)))
    assert set(ds["train"].column_names) == {"input_ids", "attention_mask", "labels"}
    with caplog.at_level("INFO", logger="qlora.tokenize"):
        ref2, _, _ = _tokenize(tmp_path, tiny_base, DEMO_DATA, max_length=64, eval_fraction=0.1)
    assert ref2 == ref1
    assert "cache hit" in caplog.text
    ref3, _, _ = _tokenize(tmp_path, tiny_base, DEMO_DATA, max_length=32, eval_fraction=0.1)
    assert ref3.fingerprint != ref1.fingerprint  # any input change is a miss


def test_truncation_keeps_max_length(tmp_path, tiny_base):
    ref, ds, _ = _tokenize(tmp_path, tiny_base, SHARED_DATA / "code_alpaca_2k.json", max_length=32)
    assert ref.truncated_rows > 0
    assert max(len(x) for x in ds["train"]["input_ids"]) == 32


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "file is empty"),
        ('{"instruction": "a", "output": "b"}\n{"instruction": "a", oops}\n', ":2: malformed JSON line"),
        ('{"instruction": "a", "output": "b"}\n[1, 2]\n', ":2: expected a JSON object, got list"),
        ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": ""}\n', ":2: missing or empty field 'output'"),
        ('{"instruction": "a", "output": 3}\n', ":1: field 'output' must be a string, got int"),
        ('{"question": "a", "answer": "b"}\n', "cannot tell the format"),
        ('[{"instruction": "a", "output": "b"}, {"instruction": "", "output": "b"}]', ": item 2: missing or empty field 'instruction'"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, tiny_base, content, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    with pytest.raises(DataError) as e:
        _tokenize(tmp_path, tiny_base, bad)
    assert str(bad) in str(e.value)
    assert message in str(e.value)


def test_a_few_bad_rows_are_dropped_not_fatal(tmp_path, tiny_base, caplog):
    good = [{"instruction": f"say {i}", "output": str(i)} for i in range(40)]
    f = tmp_path / "mostly_good.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in good) + '{"instruction": "x", "output": ""}\n')
    with caplog.at_level("WARNING", logger="qlora.tokenize"):
        ref, _, _ = _tokenize(tmp_path, tiny_base, f, max_drop_fraction=0.05)
    assert ref.train_rows + ref.eval_rows == 40
    assert f"{f}:41: missing or empty field 'output'" in caplog.text
    with pytest.raises(DataError, match=r"1 of 41 rows unusable, more than data.max_drop_fraction=0.0"):
        _tokenize(tmp_path, tiny_base, f, max_drop_fraction=0.0)


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        read_rows(tmp_path / "nope.jsonl")
