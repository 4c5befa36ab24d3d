"""The model families users bring (tests/families.py: tiny Llama-3.1, Qwen2.5, Qwen3, Mistral with their
real special tokens and chat-template conventions): their data path, and the whole flow for each.

The shared ShareGPT file (``data/public/sharegpt_dummy_conversation.json``): 2/3 of its rows are
multi-turn. ``data.format`` is ``sharegpt`` (or ``auto``, which detects it): the rows hold
``conversations`` of ``{from, value}``; ``data.format=messages`` expects ``messages`` of
``{role, content}`` and refuses the file with a hint (tested below).
"""

from __future__ import annotations

import contextlib
import io
import json
from collections import Counter

import pytest

from qlora.config.schema import DataConfig, ModelConfig
from qlora.errors import DataError
from qlora.models import load_tokenizer
from qlora.template import conversation_prompt, render_examples, template_kwargs
from tasks.data.encode import IGNORE_INDEX
from tasks.data.pipeline import prepare_data
from tests.conftest import SHARED_DATA
from tests.families import FAMILIES, NAMES, family_base  # noqa: F401
from tests.unit.tasks.test_tokenize import trained_spans

SHAREGPT = SHARED_DATA / "sharegpt_dummy_conversation.json"
ROWS = json.loads(SHAREGPT.read_text())


def _subset(tmp_path, n: int) -> str:
    """The first n rows (both single- and multi-turn ones), written like the user's own file."""
    path = tmp_path / "conversations.json"
    path.write_text(json.dumps(ROWS[:n], indent=1))
    return str(path)


def _tok(family_base, name):
    return load_tokenizer(ModelConfig(name_or_path=str(family_base(name))))


# ------------------------------------------------------------------ the fixtures are what they claim


def test_family_conventions(family_base):
    conv = [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am Vicuna."},
            {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye!"}]
    from transformers import AutoTokenizer

    toks = {n: AutoTokenizer.from_pretrained(family_base(n)) for n in NAMES}
    render = {n: t.apply_chat_template(conv, tokenize=False) for n, t in toks.items()}
    assert toks["llama-3.1"].pad_token is None and toks["mistral"].pad_token is None  # as shipped
    assert toks["qwen2.5"].pad_token == "<|endoftext|>" and toks["qwen3"].eos_token == "<|im_end|>"
    assert render["llama-3.1"].startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                                          "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>")
    assert toks["llama-3.1"]("hi")["input_ids"][0] == toks["llama-3.1"].bos_token_id  # BOS added by the tokenizer too
    assert "You are Qwen, created by Alibaba Cloud. You are a helpful assistant." in render["qwen2.5"]
    # Qwen3: only the answer after the last user turn carries a think block; earlier ones are stripped
    assert render["qwen3"].count("<think>") == 1 and render["qwen3"].endswith("<think>\n\n</think>\n\nGoodbye!<|im_end|>\n")
    gen = toks["qwen3"].apply_chat_template(conv[:1], tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert gen.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert render["mistral"] == "<s>[INST] Who are you?[/INST] I am Vicuna.</s>[INST] Bye[/INST] Goodbye!</s>"
    import jinja2

    with pytest.raises(jinja2.TemplateError, match="roles must alternate"):
        toks["mistral"].apply_chat_template(conv[:1] * 2, tokenize=False)


# ------------------------------------------------------------------ the data path, per family


@pytest.mark.parametrize("name", NAMES)
def test_sharegpt_trains_each_answer_once_with_the_consumers_prompt(family_base, tmp_path, name):
    """Every row kept; every gpt turn trained exactly once (plus the family's end-of-turn); each eval prompt
    tokenizes at inference to exactly the ids training saw before the answer; a standalone eval row's prompt
    is what a consumer gets by sending its message through the logged prompt template."""
    tok = _tok(family_base, name)
    n = 90
    prep = prepare_data(DataConfig(path=_subset(tmp_path, n), format="sharegpt", max_length=512, eval_fraction=0.1), tok)
    r = prep.report
    multi = sum(len(row["conversations"]) > 2 for row in ROWS[:n])
    assert r.rows_dropped == 0 and r.rows_read == n
    # Qwen3 renders earlier answers without thinking once a later user turn follows: one example per turn
    assert r.rows_expanded == (multi if name == "qwen3" else 0)
    answers = Counter(t["value"] for row in ROWS[:n] for t in row["conversations"] if t["from"] == "gpt")
    eot = tok.eos_token
    trained = Counter(tok.decode(span) for split in (prep.train, prep.eval) for lab in split["labels"]
                      for span in trained_spans(lab))
    lead = " " if name == "mistral" else ""  # Mistral's template writes ' ' + answer
    assert trained == Counter({f"{lead}{a.strip()}{eot}": c for a, c in answers.items()})
    assert not any("<think>" in t for t in trained)  # Qwen3: no empty think block trained (enable_thinking=false)
    kwargs = template_kwargs(tok, None, None)
    for ex in prep.eval:
        ids = tok(ex["prompt"])["input_ids"]  # what evaluation and MLflow's pipeline feed the model
        assert ex["input_ids"][: len(ids)] == ids and ex["labels"][len(ids) - 1] == IGNORE_INDEX
        # the prompt leads into the last answer of the row (the turn evaluation scores), which is trained
        assert ex["labels"][len(ids)] != IGNORE_INDEX and ex["reference"] in tok.decode(ex["input_ids"][len(ids):])
        assert ids.count(tok.bos_token_id) == (1 if FAMILIES[name]["adds_bos"] else 0)  # never a doubled BOS
        # what a chat consumer sends for it (the conversation before that answer) renders to exactly that prompt
        sent = [(t["role"], t["content"]) for t in json.loads(ex["conversation"])]
        assert sent[-1] == ("user", ex["message"]) and conversation_prompt(sent, tok, None, kwargs) == ex["prompt"]
        if ex["standalone"]:
            assert prep.prompt_template.format(prompt=ex["message"]) == ex["prompt"]
    assert sum(prep.eval["standalone"]) >= 1 and any(len(json.loads(c)) > 1 for c in prep.eval["conversation"])
    assert prep.chat is not None and prep.chat.system is None and prep.chat.systems == 0  # no system turns here


def test_qwen3_multi_turn_and_thinking(family_base, tmp_path):
    """Before: Qwen3 multi-turn rows raised TemplateError and aborted the run, and single-turn rows trained
    an empty <think></think> block no consumer prompt ever leads into."""
    tok = _tok(family_base, "qwen3")
    path = _subset(tmp_path, 12)
    prep = prepare_data(DataConfig(path=path, format="sharegpt", max_length=512, eval_fraction=0.25), tok)
    assert prep.report.rows_dropped == 0 and prep.report.rows_expanded == 8
    assert "enable_thinking" not in prep.prompt_template and prep.prompt_template.endswith("<think>\n\n</think>\n\n")
    assert all(len(trained_spans(lab)) == 1 for lab in prep.train["labels"])  # one answer per example, history untrained
    # The history of a later turn is rendered as at inference: the earlier answer without a think block.
    later = next(e for e in prep.eval if not e["standalone"])
    assert later["prompt"].count("<think>") == 1 and later["prompt"].endswith("<think>\n\n</think>\n\n")
    # Asked for: data.chat_template_kwargs {enable_thinking: true} trains the (empty) think block with the answer.
    asked = prepare_data(DataConfig(path=path, format="sharegpt", max_length=512, eval_fraction=0.25,
                               chat_template_kwargs={"enable_thinking": True}), tok)
    spans = [tok.decode(s) for lab in asked.train["labels"] for s in trained_spans(lab)]
    assert spans and all(s.startswith("<think>\n\n</think>\n\n") for s in spans)
    assert asked.prompt_template.endswith("<|im_start|>assistant\n")


def test_mistral_renders_system_turns_as_it_serves_them(family_base, tmp_path):
    """Before: Mistral's template writes the system message into the *last* user turn only, so once an answer
    follows the prompt renders without it; such rows (one in 30 here) were dropped as template_error. Now each
    assistant turn is trained after exactly the prompt a consumer's conversation renders (system folded into
    that turn's user message), with the answer as the template writes it."""
    rows = [{"conversations": [{"from": "human", "value": f"say {i}"}, {"from": "gpt", "value": str(i)}]} for i in range(30)]
    rows[7]["conversations"].insert(0, {"from": "system", "value": "Be brief."})
    rows[9]["conversations"] = [{"from": "system", "value": "Be brief."}] + rows[9]["conversations"] * 2
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = _tok(family_base, "mistral")
    prep = prepare_data(DataConfig(path=str(path), max_length=64, max_drop_fraction=0.0), tok)
    assert prep.report.rows_dropped == 0 and prep.report.rows_expanded == 1
    turns = [("system", "Be brief."), ("user", "say 9"), ("assistant", "9"), ("user", "say 9"), ("assistant", "9")]
    examples = render_examples(turns, tok, None, {})
    assert [e.prompt for e in examples] == ["[INST] Be brief.\n\nsay 9[/INST]", "[INST] say 9[/INST] 9</s>[INST] Be brief.\n\nsay 9[/INST]"]
    assert [e.prompt for e in examples] == [conversation_prompt(turns[:2], tok), conversation_prompt(turns[:4], tok)]
    assert [e.segments for e in examples] == [[(e.prompt, False), (" 9</s>", True)] for e in examples]
    # the rows' system prompts vary (one, and none): consumers get no default system prompt
    assert prep.chat.system is None and prep.chat.systems == 1 and prep.chat.rows_without_system == 28


def test_a_row_the_template_refuses_is_dropped_with_its_line(tiny_base, tmp_path):
    """Before: one such row raised DataError and aborted the whole run."""
    rows = [{"conversations": [{"from": "human", "value": f"say {i}"}, {"from": "gpt", "value": str(i)}]} for i in range(30)]
    rows[7]["conversations"].insert(0, {"from": "system", "value": "Be brief."})
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # A template that refuses a row outright (raise_exception, as Gemma's does for a system turn)
    no_system = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                 "{% endif %}<{{ m['role'] }}>{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
                 "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_base)))
    prep = prepare_data(DataConfig(path=str(path), max_length=64, chat_template=no_system, max_drop_fraction=0.1), tok)
    assert prep.report.problem_lines == [f"{path}:8: the chat template refuses this conversation: System role not supported"]
    assert prep.report.rows_read == 30 and prep.report.train_rows + prep.report.eval_rows == 29


def test_sharegpt_file_needs_format_sharegpt_not_messages(family_base):
    with pytest.raises(DataError, match="rows look like sharegpt"):
        prepare_data(DataConfig(path=str(SHAREGPT), format="messages"), _tok(family_base, "qwen2.5"))


# ------------------------------------------------------------------ the whole flow, per family


SYSTEM = "You are a helpful assistant."


def _messages(tmp_path, rows: list[dict], name: str = "chat.json") -> str:
    """ShareGPT rows in ``messages`` format, each opened by the system prompt most public chat data carries."""
    roles = {"human": "user", "gpt": "assistant"}
    path = tmp_path / name
    path.write_text(json.dumps([{"messages": [{"role": "system", "content": SYSTEM}]
                                 + [{"role": roles[t["from"]], "content": t["value"]} for t in r["conversations"]]}
                                for r in rows], indent=1))
    return str(path)


def _flow(model_name: str, base, data_path: str, tmp_path, **overrides):
    """The whole flow on a tiny base, as ``qlora run`` runs it: (the flow's state, MLflow client)."""
    import mlflow

    from flows.finetune import qlora_finetune
    from qlora.config.files import load_config

    settings = {
        "workdir": tmp_path / "work", "model.name_or_path": base, "data.path": data_path,
        "data.max_length": 256, "data.eval_fraction": 0.1,
        "train.max_steps": 2, "train.per_device_train_batch_size": 4, "train.gradient_accumulation_steps": 1,
        "train.learning_rate": 5e-3, "train.logging_steps": 1, "train.save_steps": 100, "lora.r": 4, "lora.alpha": 8,
        "registry.model_name": model_name, "registry.bootstrap_resamples": 100,
        "tracking.artifact_location": tmp_path / "mlartifacts",
    } | overrides
    state = qlora_finetune(config=load_config(None, [f"{k}={v}" for k, v in settings.items()]), return_state=True)
    return state, mlflow.MlflowClient()


def _eval_table(client, run_id: str, tmp_path) -> list[dict]:
    """The run's logged eval samples (``eval/samples.json``: {columns, data}) as rows."""
    import mlflow

    logged = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/eval/samples.json", dst_path=str(tmp_path))
    table = json.loads(open(logged).read())
    return [dict(zip(table["columns"], row)) for row in table["data"]]


def _predict(*argv: str) -> str:
    """``qlora predict`` of one prompt as parsed and run by the command: its output whole (a reply may hold
    newlines). Not main() and not capsys: both leave handlers on a per-test stream that Prefect's logging of
    the next flow run would write to after it is closed."""
    from flows.cli import build_parser

    args = build_parser().parse_args(["predict", *argv])
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert args.func(args) == 0
    return out.getvalue().removesuffix("\n")


@pytest.mark.e2e
@pytest.mark.parametrize("name", NAMES)
def test_whole_flow_per_family(name, family_base, prefect_server, tmp_path, mlflow_uri):
    """The flow on the first 60 ShareGPT rows in ``messages`` format, each opened by one system prompt (40 of them
    multi-turn) ends with a registered version whose consumer check compared whole conversations (system turn and
    earlier turns included), whose input example is a conversation of that data, and which ``qlora predict
    --messages`` answers exactly as evaluation generated for the same conversation. The version records the one
    system prompt of its data and applies it to a bare string: the reply is the one for [system, user]."""
    import mlflow

    model_name = "fam-" + name.replace(".", "")
    state, client = _flow(model_name, family_base(name), _messages(tmp_path, ROWS[:60]), tmp_path,
                          # eval.batch_size 1: evaluation generates as `qlora predict` does, one prompt at a time, so
                          # its answers below are exact references (a batch's padding can flip bf16 near-ties: AMX CPUs)
                          **{"eval.max_samples": 8, "eval.max_new_tokens": 6, "eval.batch_size": 1,
                             "registry.consumer_check_prompts": 2})
    assert state.is_completed(), state.message
    version = state.result()
    assert version.consumer_checked == 2 and "rouge vs base" in version.decision  # sentences: gated on ROUGE-L
    mv = client.get_model_version(model_name, version.version)
    assert client.get_run(mv.run_id).data.metrics["gate/consumer_checked"] == 2
    assert mv.tags["consumer.system_prompt"] == SYSTEM and f"system prompt `{SYSTEM}`" in mv.description
    uri = f"models:/{model_name}@challenger"
    example = mlflow.models.Model.load(uri).load_input_example(mlflow.artifacts.download_artifacts(uri))
    assert example["messages"][0] == {"role": "system", "content": SYSTEM}
    assert example["messages"][-1]["content"] in {t["value"] for row in ROWS[:60] for t in row["conversations"]}

    rows = _eval_table(client, mv.run_id, tmp_path)
    multi = next(r for r in rows if len(json.loads(r["conversation"])) > 2)  # system, user, assistant, user, ...
    conversation = tmp_path / "conversation.json"
    conversation.write_text(json.dumps({"messages": json.loads(multi["conversation"])}))
    single = next(r for r in rows if len(json.loads(r["conversation"])) == 2)
    # one conversation, then a bare string (no system: the version's own) and the same with the system prompt sent
    got = _predict(uri, "--messages", str(conversation), "--max-new-tokens", "6")
    assert got == multi["tuned"]  # what evaluation generated for that conversation, greedily
    assert _predict(uri, single["message"], "--max-new-tokens", "6") == single["tuned"]
    assert _predict(uri, single["message"], "--system", SYSTEM, "--max-new-tokens", "6") == single["tuned"]


@pytest.mark.e2e
def test_llama3_base_on_system_prompted_chat_rows_registers_checks_and_promotes(family_base, prefect_server, tmp_path,
                                                                               mlflow_uri):
    """The reported case: a Llama-3-style base (its chat template, <|eot_id|> as EOS, no pad token) fine-tuned on 175
    public chat rows in ``messages`` format, each a system prompt, a user turn and the answer (the first exchange of
    each of the first 175 ShareGPT conversations). Before: ConsumerCheckError, "no eval sample is a single user
    message a consumer could send". Registry settings are the defaults: the consumer check compares 3 conversations."""
    rows = [{"conversations": r["conversations"][:2]} for r in ROWS[:175]]
    state, client = _flow("llama3-chat", family_base("llama-3.1"), _messages(tmp_path, rows), tmp_path,
                          **{"train.max_steps": 60, "train.per_device_train_batch_size": 8, "train.learning_rate": 2e-2,
                             "lora.r": 8, "lora.alpha": 16,
                             "eval.max_new_tokens": 8, "eval.batch_size": 9})
    assert state.is_completed(), state.message
    version = state.result()
    assert version.consumer_checked == 3
    assert "champion" in version.aliases, version.decision  # the gate allowed it: ROUGE-L above the base's
    mv = client.get_model_version("llama3-chat", version.version)
    assert mv.tags["consumer.contract"] == "conversation" and mv.tags["consumer.system_prompt"] == SYSTEM
