"""Registered chat models as consumers get them: the consumer check on chat templates, the input example and
signature taken from the run's own data, every generation parameter end to end, and a hub base recorded by
id + commit and loaded from the hub (the local pre-quantized copy only as a fallback).

One tiny Llama-3.1 (tests/families.py: no pad token, a BOS both template and tokenizer write, sampling
defaults in its generation_config) is trained for a few steps on ShareGPT rows; its outputs are real.
"""

from __future__ import annotations

import json
import logging
import shutil

import mlflow
import pytest

from qlora.config.schema import (
    DataConfig,
    EvalConfig,
    LoraSection,
    ModelConfig,
    QuantizationConfig,
    RegistryConfig,
    TrackingConfig,
    TrainConfig,
)
from qlora.models import ModelCache, load_tuned
from qlora.tracking.runs import start_run
from registry import consumer
from registry.register import ConsumerCheckError, register_adapter
from tasks.evaluate import evaluate_adapter
from tasks.quantize import prepare_quantized_model
from tasks.tokenize import tokenize_dataset
from tasks.train import train_adapter
from tests.conftest import SHARED_DATA
from tests.families import family_base  # noqa: F401

ROWS = json.loads((SHARED_DATA / "sharegpt_dummy_conversation.json").read_text())[:60]
USER_MESSAGES = {t["value"] for r in ROWS for t in r["conversations"] if t["from"] == "human"}


def _stages(model: ModelConfig, work, rows_path, models: ModelCache | None = None):
    data = tokenize_dataset(DataConfig(path=str(rows_path), format="sharegpt", max_length=256, eval_fraction=0.1), model, work)
    base = prepare_quantized_model(model, QuantizationConfig(), work)
    train = TrainConfig(max_steps=3, per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=5e-3,
                        logging_steps=1, save_steps=100)
    adapter = train_adapter(base, data, LoraSection(r=8, alpha=16, dropout=0.0), train, work)
    report = evaluate_adapter(base, adapter, data, EvalConfig(max_samples=4, max_new_tokens=8, batch_size=4), models=models)
    return data, base, adapter, report


@pytest.fixture(scope="module")
def llama(family_base, tmp_path_factory):
    work = tmp_path_factory.mktemp("consumers")
    (work / "rows.json").write_text(json.dumps(ROWS))
    return _stages(ModelConfig(name_or_path=str(family_base("llama-3.1"))), work, work / "rows.json")


def _run(uri, tmp_path):
    return start_run(TrackingConfig(uri=uri, artifact_location=str(tmp_path / "art")), run_name="consumer")


def test_consumer_check_sends_the_eval_messages_through_a_chat_template(llama, mlflow_uri, tmp_path):
    """Before: the check could only invert the built-in template, compared nothing for a chat model and passed."""
    data, base, adapter, report = llama
    assert all(s["message"] in USER_MESSAGES for s in report.samples)
    cfg = RegistryConfig(model_name="chat", bootstrap_resamples=100, consumer_check_prompts=3)
    v = register_adapter(base, adapter, report, cfg, _run(mlflow_uri, tmp_path), data)
    assert v.consumer_checked == 3
    assert mlflow.MlflowClient(mlflow_uri).get_run(mlflow.MlflowClient(mlflow_uri).get_model_version("chat", v.version).run_id
                                                   ).data.metrics["gate/consumer_checked"] == 3
    tampered = report.model_copy(deep=True)  # evaluation rendered the first row without the chat template
    tampered.samples[0]["prompt"] = tampered.samples[0]["message"]
    with pytest.raises(ConsumerCheckError, match=r"models:/chat/2 it does not generate what the evaluated model generated: "
                                                 r"conversation \["):
        register_adapter(base, adapter, tampered, cfg, _run(mlflow_uri, tmp_path), data)
    assert mlflow.MlflowClient(mlflow_uri).get_registered_model("chat").aliases == {"challenger": 2}  # sqlite store: an int


def test_the_check_sends_conversations_with_history_and_a_check_that_compares_nothing_fails(llama, mlflow_uri, tmp_path):
    """Before: only eval rows whose prompt was one bare user message could be compared; rows with earlier turns or
    a system turn were skipped, and a run with none of those failed. Now a chat version is sent every row's
    conversation. Samples carrying no conversation (what a consumer sends) still fail the check, not pass it."""
    data, base, adapter, report = llama
    history_only = report.model_copy(update={"samples": [s | {"standalone": False} for s in report.samples]})
    cfg = RegistryConfig(model_name="nothing", bootstrap_resamples=100, consumer_check_prompts=2)
    assert register_adapter(base, adapter, history_only, cfg, _run(mlflow_uri, tmp_path), data).consumer_checked == 2
    unsendable = report.model_copy(update={"samples": [s | {"conversation": ""} for s in report.samples]})
    with pytest.raises(ConsumerCheckError, match="nothing was compared"):
        register_adapter(base, adapter, unsendable, cfg, _run(mlflow_uri, tmp_path), data)
    skipped = register_adapter(base, adapter, unsendable, cfg.model_copy(update={"consumer_check_prompts": 0}),
                               _run(mlflow_uri, tmp_path), data)
    assert skipped.consumer_checked == 0 and skipped.aliases == ["challenger"]


def test_input_example_signature_and_every_param_end_to_end(llama, mlflow_uri, tmp_path, monkeypatch):
    """Before: every model was logged with the demo's 'Reverse the order...' example, and top_p, top_k,
    repetition_penalty and stop strings were not in the params schema (MLflow drops unknown params)."""
    import torch

    data, base, adapter, report = llama
    v = register_adapter(base, adapter, report, RegistryConfig(model_name="params", consumer_check_prompts=0,
                                                               bootstrap_resamples=100), _run(mlflow_uri, tmp_path), data)
    uri = f"models:/params/{v.version}"
    logged = mlflow.models.Model.load(uri)
    example = logged.load_input_example(mlflow.artifacts.download_artifacts(uri))
    assert example == {"messages": json.loads(report.samples[0]["conversation"])}  # a real conversation of the eval rows
    assert example["messages"][-1]["content"] in USER_MESSAGES
    assert [i.name for i in logged.signature.inputs.inputs] == ["messages"]
    assert logged.signature.params.params[-1].name == "stop_sequence"
    assert logged.flavors["python_function"]["loader_module"] == "registry.chat"

    model = mlflow.pyfunc.load_model(uri)
    message = report.samples[0]["message"]

    def pyfunc(**params):
        return model.predict({"messages": [{"role": "user", "content": message}]}, params=params)[0].strip()

    greedy = pyfunc(max_new_tokens=12)
    assert greedy == consumer.predict(uri, [message], max_new_tokens=12)[0]
    # tracking_uri= alone finds the version (no MLFLOW_TRACKING_URI; another store current): make chaos found
    # predict reading the chat contract from the default store first ("Registered Model ... not found")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'elsewhere.db'}")
    try:
        assert consumer.predict(uri, [message], max_new_tokens=12, tracking_uri=mlflow_uri)[0] == greedy
    finally:
        mlflow.set_tracking_uri(mlflow_uri)
    # max_new_tokens: fewer tokens, same greedy start
    short = pyfunc(max_new_tokens=3)
    assert greedy.startswith(short) and len(short) < len(greedy)
    # sampling collapsed to the argmax by top_k=1, a tiny top_p or a tiny temperature gives the greedy text,
    # even at a temperature that otherwise makes every token a coin toss
    torch.manual_seed(0)
    assert pyfunc(max_new_tokens=12, do_sample=True, temperature=5.0, top_k=1) == greedy
    assert pyfunc(max_new_tokens=12, do_sample=True, temperature=5.0, top_p=1e-9) == greedy
    assert pyfunc(max_new_tokens=12, do_sample=True, temperature=1e-6) == greedy
    assert pyfunc(max_new_tokens=12, do_sample=True, temperature=5.0) != greedy  # the above were not luck
    # repetition_penalty: what generate() gives with the same penalty on the same tokens
    tuned, tok = load_tuned(base, adapter)
    enc = tok([data.prompt_template.format(prompt=message)], return_tensors="pt")
    with torch.no_grad():
        ids = tuned.generate(**enc, max_new_tokens=12, do_sample=False, repetition_penalty=1e4)
    penalised = tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert penalised != greedy and pyfunc(max_new_tokens=12, repetition_penalty=1e4) == penalised
    # stop_sequence: generation ends once the stop text is out (the text is kept)
    words = greedy.split()
    stop = next(w for w in words[1:] if w.isalpha())
    stopped = pyfunc(max_new_tokens=12, stop_sequence=stop)
    assert stopped.endswith(stop) and greedy.startswith(stopped) and len(stopped) < len(greedy)
    assert consumer.predict(uri, [message], max_new_tokens=12, stop=stop)[0] == stopped


def _fake_hub(src, cache, repo_id: str, commit: str):
    """``src`` as huggingface_hub caches a download of ``repo_id`` at ``commit`` (revision main)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(src, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return repo


def test_a_hub_base_is_recorded_by_id_and_commit_and_consumers_load_it_from_the_hub(
        family_base, tmp_path, mlflow_uri, monkeypatch, caplog):
    """Before: the registered adapter pointed at .qlora/quantized/<hash> only, usable on that machine alone.
    The hub is a real huggingface_hub cache (HF_HUB_OFFLINE=1 resolves revision main to its commit there);
    only the download that would have filled it is left out."""
    import huggingface_hub

    commit = "0123456789abcdef0123456789abcdef01234567"
    hub = tmp_path / "hub"
    _fake_hub(family_base("qwen2.5"), hub, "tiny-org/qwen2.5-tiny", commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("QLORA_BASE_CACHE", str(tmp_path / "bases"))
    (tmp_path / "rows.json").write_text(json.dumps(ROWS[:40]))
    model = ModelConfig(name_or_path="tiny-org/qwen2.5-tiny")
    data, base, adapter, report = _stages(model, tmp_path / "work", tmp_path / "rows.json")
    assert (base.hub_id, base.commit, base.revision) == ("tiny-org/qwen2.5-tiny", commit, None)

    cfg = RegistryConfig(model_name="hub", bootstrap_resamples=100, consumer_check_prompts=2)
    v = register_adapter(base, adapter, report, cfg, _run(mlflow_uri, tmp_path), data)
    assert v.consumer_checked == 2  # through the base rebuilt from the hub: identical 4-bit weights, identical outputs
    assert [p.name for p in (tmp_path / "bases").iterdir()]  # it was rebuilt, not read from .qlora
    mv = mlflow.MlflowClient(mlflow_uri).get_model_version("hub", v.version)
    assert mv.tags["base.hub_id"] == "tiny-org/qwen2.5-tiny" and mv.tags["base.commit"] == commit
    assert f"`tiny-org/qwen2.5-tiny` at commit `{commit}`" in mv.description and "only the fallback" in mv.description
    meta = mlflow.models.Model.load(f"models:/hub/{v.version}").metadata["qlora_base"]
    assert meta["commit"] == commit and meta["quantization"]["quant_type"] == "nf4"

    message = next(s for s in report.samples if s["standalone"])
    want = message["tuned"]
    # Another machine: no .qlora folder, nothing built yet; the base comes from the hub.
    shutil.move(base.path, tmp_path / "elsewhere")
    monkeypatch.setenv("QLORA_BASE_CACHE", str(tmp_path / "bases-2"))
    assert consumer.predict(f"models:/hub/{v.version}", [message["message"]], max_new_tokens=8)[0] == want
    # The hub unreachable (nothing cached, offline): the recorded local copy, with a warning saying so.
    shutil.move(tmp_path / "elsewhere", base.path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("QLORA_BASE_CACHE", str(tmp_path / "bases-3"))
    with caplog.at_level(logging.WARNING, logger="qlora.consumer"):
        assert consumer.predict(f"models:/hub/{v.version}", [message["message"]], max_new_tokens=8)[0] == want
    assert "falling back to the local copy" in caplog.text and base.path in caplog.text


def test_hub_ids_with_a_version_in_their_name_are_hub_ids():
    """Before: ``Path(name).suffix`` ('.1-8B-Instruct') made the quantize stage refuse the real ids of this
    issue's families, and configs/gpu-example.yaml's Qwen/Qwen2.5-0.5B-Instruct, as 'neither a local directory
    nor a hub id'."""
    from qlora.models import base_identity

    for hub_id in ("meta-llama/Llama-3.1-8B-Instruct", "Qwen/Qwen2.5-7B-Instruct", "mistralai/Mistral-7B-Instruct-v0.3",
                   "Qwen/Qwen3-8B", "gpt2"):
        assert base_identity(ModelConfig(name_or_path=hub_id)) == {"hub_id": hub_id, "revision": "main"}
    from qlora.errors import ModelError

    for bad in ("./missing-dir", "/abs/missing", "a/b/c", "weights.safetensors", "org/../x"):
        with pytest.raises(ModelError, match="neither an existing local directory nor a hub id"):
            base_identity(ModelConfig(name_or_path=bad))


def test_a_bare_string_gets_the_one_system_prompt_of_the_training_data(llama, mlflow_uri, tmp_path, capsys):
    """A version whose training rows all had one system prompt applies it to a conversation that brings none: a bare
    string gets exactly the prompt, and so the reply, of [that system prompt, the string]. Without one recorded
    (the rows' system prompts varied) nothing is added. Conversations that cannot be answered are refused by name."""
    from flows.cli import main
    from qlora.refs import ChatContract
    from qlora.template import conversation_prompt
    from registry.chat import ConversationError
    from registry.consumer import requests

    data, base, adapter, report = llama
    system = "You are a helpful assistant."
    fixed = data.model_copy(update={"chat": data.chat.model_copy(update={"system": system, "systems": 1})})
    cfg = RegistryConfig(model_name="fixed", bootstrap_resamples=100, consumer_check_prompts=0)
    v = register_adapter(base, adapter, report.model_copy(update={"data": fixed}), cfg, _run(mlflow_uri, tmp_path), fixed)
    uri = f"models:/fixed/{v.version}"
    mv = mlflow.MlflowClient(mlflow_uri).get_model_version("fixed", v.version)
    assert mv.tags["consumer.system_prompt"] == system and f"system prompt `{system}`" in mv.description

    message = report.samples[0]["message"]
    chat = mlflow.pyfunc.load_model(uri)._model_impl  # registry.chat.ChatModel in front of MLflow's pyfunc
    tok = chat.inner.pipeline.tokenizer
    with_system = conversation_prompt([("system", system), ("user", message)], tok)
    assert chat.render([("user", message)]) == with_system != conversation_prompt([("user", message)], tok)
    bare = consumer.predict(uri, [message], max_new_tokens=12)
    assert bare == consumer.predict(uri, [message], max_new_tokens=12, system=system)
    assert bare == consumer.predict(uri, [[{"role": "system", "content": system}, {"role": "user", "content": message}]],
                                    max_new_tokens=12)
    # batch prediction of a chat version: each prompt is one user turn, answered as qlora predict answers it
    from registry.batch import predict_file

    # in a process whose global MLflow URI is another store (a worker's flow run): tracking_uri finds the version
    mlflow.set_tracking_uri((tmp_path / "another-store").as_uri())
    try:
        out = predict_file(uri, [message], tmp_path / "preds.jsonl", 2, {"max_new_tokens": 12}, mlflow_uri)
    finally:
        mlflow.set_tracking_uri(mlflow_uri)
    assert json.loads(open(out.output).read())["prediction"] == bare[0]
    from registry.chat import ChatModel

    assert ChatModel(chat.inner, ChatContract(systems=2)).render([("user", message)]) == conversation_prompt([("user", message)], tok)

    with pytest.raises(mlflow.exceptions.MlflowException, match="must end with a user turn"):
        mlflow.pyfunc.load_model(uri).predict({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    with pytest.raises(ConversationError, match="has a system turn already"):
        requests([[{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]], fixed.chat, system="c")
    with pytest.raises(ConversationError, match="takes bare prompts"):
        requests([[{"role": "user", "content": "b"}]], None)
    assert main(["predict", uri, "--messages", str(tmp_path / "missing.json")]) == 1
    assert f"--messages {tmp_path / 'missing.json'}: cannot read it" in capsys.readouterr().err
