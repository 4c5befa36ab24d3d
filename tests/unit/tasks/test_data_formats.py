"""Every format: labels decode to exactly the assistant text + EOS; training and inference prompts agree."""

import random

import pytest

from qlora.config.schema import DataConfig, ModelConfig
from qlora.models import load_tokenizer
from qlora.template import PROMPT_TEMPLATE, inference_prompt, prompt_template_for, render_turns
from tasks.data.encode import IGNORE_INDEX
from tasks.data.pipeline import prepare_data
from tests.unit.tasks.test_tokenize import CHAT_TEMPLATE, trained_spans

WORDS = "apple river stone desert violet coffee thunder dragon shadow ocean velvet music bread lamp meadow".split()


@pytest.fixture(scope="module")
def tok(tiny_base):
    return load_tokenizer(ModelConfig(name_or_path=str(tiny_base)))


def _say(rng, n=None):
    return " ".join(rng.choice(WORDS) for _ in range(n or rng.randint(1, 6)))


def _conversation(rng) -> list[tuple[str, str]]:
    turns = [("system", _say(rng))] if rng.random() < 0.3 else []
    for _ in range(rng.randint(1, 3)):
        turns += [("user", _say(rng)), ("assistant", _say(rng))]
    return turns


def _row(fmt: str, turns):
    if fmt == "messages":
        return {"messages": [{"role": r, "content": c} for r, c in turns]}
    if fmt == "sharegpt":
        names = {"system": "system", "user": "human", "assistant": "gpt"}
        return {"conversations": [{"from": names[r], "value": c} for r, c in turns]}
    user, answer = turns[-2][1], turns[-1][1]
    if fmt == "alpaca":
        return {"instruction": user, "input": "", "output": answer}
    if fmt == "prompt_completion":
        return {"prompt": user, "completion": answer}
    return {"text": answer}


def _answers(fmt, turns):
    if fmt in ("messages", "sharegpt"):
        return [c for r, c in turns if r == "assistant"]
    return [turns[-1][1]]


@pytest.mark.parametrize("template", [None, CHAT_TEMPLATE], ids=["builtin", "chat_template"])
@pytest.mark.parametrize("fmt", ["alpaca", "sharegpt", "messages", "prompt_completion", "text"])
def test_trained_tokens_are_exactly_each_answer_plus_eos(tmp_path, tok, fmt, template):
    import json

    rng = random.Random(f"{fmt}-{template is None}")
    convs = [_conversation(rng) for _ in range(40)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(_row(fmt, c)) + "\n" for c in convs))
    prep = prepare_data(DataConfig(path=str(path), max_length=256, chat_template=template, eval_fraction=0.5, seed=1), tok)
    assert prep.report.format == fmt and prep.report.rows_dropped == 0
    expected = sorted(
        [[tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for a in _answers(fmt, c)] for c in convs]
    )
    got = sorted(trained_spans(lab) for split in (prep.train, prep.eval) for lab in split["labels"])
    if template is not None and fmt != "text":
        # the template writes the end-of-turn (EOS) itself; the newline after it is layout, not trained
        assert all("<|assistant|>" in ex for ex in prep.report.examples)
    assert got == expected
    decoded = sorted([tok.decode(s).lstrip() for s in trained_spans(lab)] for split in (prep.train, prep.eval) for lab in split["labels"])
    assert decoded == sorted([a + tok.eos_token for a in _answers(fmt, c)] for c in convs)
    # everything not trained is masked, and nothing is masked twice: labels are ids or -100
    for split in (prep.train, prep.eval):
        for ids, lab in zip(split["input_ids"], split["labels"]):
            assert all(l in (IGNORE_INDEX, i) for i, l in zip(ids, lab))


@pytest.mark.parametrize("template", [None, CHAT_TEMPLATE], ids=["builtin", "chat_template"])
def test_training_prompt_is_the_consumers_prompt(tmp_path, tok, template):
    """What training feeds before an answer is what a registry consumer sends for the same message."""
    path = tmp_path / "pc.jsonl"
    path.write_text('{"prompt": "reverse: apple river", "completion": "river apple"}\n' * 4)
    prep = prepare_data(DataConfig(path=str(path), max_length=64, chat_template=template, eval_fraction=0.25), tok)
    ex = prep.eval[0]
    consumer_text = prep.prompt_template.format(prompt="reverse: apple river")  # MLflow's prompt_template
    assert consumer_text == ex["prompt"] == inference_prompt("reverse: apple river", tok, template)
    answer = tok("river apple", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex["input_ids"] == tok(consumer_text)["input_ids"] + answer
    if template is None:
        assert prep.prompt_template == PROMPT_TEMPLATE  # what registry/register.py logs today


def test_tokenizers_own_chat_template_wins_and_braces_survive(tok):
    own = CHAT_TEMPLATE.replace("<|{{ m['role'] }}|>", "[{{ m['role'] }}] {x}").replace("<|assistant|>", "[assistant] {x}")
    tok.chat_template = own
    try:
        turns = [("user", "hi"), ("assistant", "ho")]
        segs = render_turns(turns, tok, fallback="unused")
        # (HF renders templates with trim_blocks: the newline after {% endif %} is eaten)
        assert segs == [("[user] {x}\nhi[assistant] {x}\n", False), ("ho" + tok.eos_token, True)]
        tmpl = prompt_template_for(tok, "unused")
        assert tmpl.format(prompt="hi") == inference_prompt("hi", tok) == segs[0][0]
    finally:
        tok.chat_template = None
