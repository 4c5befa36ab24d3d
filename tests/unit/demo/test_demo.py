import json

from demo.build import WORDS, reversal_rows
from qlora.template import PROMPT_TEMPLATE, format_prompt, user_message
from tests.conftest import DEMO_DATA


def test_shipped_demo_data_is_what_the_generator_makes():
    shipped = [json.loads(line) for line in DEMO_DATA.read_text().splitlines()]
    assert shipped == reversal_rows()


def test_demo_rows_are_unique_reversals():
    rows = reversal_rows(n=500, seed=3)
    assert len({r["instruction"] for r in rows}) == 500
    for r in rows:
        words = r["instruction"].split(": ", 1)[1].split()
        assert len(words) == 3 and set(words) <= set(WORDS)
        assert r["output"].split() == words[::-1]


def test_tiny_base_is_deterministic(tiny_base, tmp_path):
    from demo.build import build_demo_base

    again = build_demo_base(tmp_path / "again", DEMO_DATA, hidden_size=64, num_layers=2, num_heads=2, vocab_size=512)
    for name in ("model.safetensors", "tokenizer.json"):
        assert (again / name).read_bytes() == (tiny_base / name).read_bytes()


def test_demo_tokenizer_keeps_words_whole(tiny_base):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    ids = tok(" ".join(WORDS[:10]), add_special_tokens=False)["input_ids"]
    assert len(ids) == 10
    assert tok.decode(ids).strip() == " ".join(WORDS[:10])


def test_one_template_for_training_and_consumers():
    msg = user_message("Reverse the order of these words: a b c")
    assert format_prompt(msg) == PROMPT_TEMPLATE.format(prompt=msg)
    assert PROMPT_TEMPLATE.count("{prompt}") == 1  # the form MLflow's prompt_template accepts
    assert user_message("Do it.", "with this") == "Do it.\nwith this"
