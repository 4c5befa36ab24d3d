"""The model registry against a real ``mlflow server`` on loopback: lineage, the promotion gate, the
consumer check, consumers (pyfunc, ``mlflow models serve``) and the registry commands.

One tiny adapter is trained and evaluated once (module fixture); its outputs are real. To drive the
gate both ways without training a model that truly learns (minutes on CPU), some tests replace the
per-example *scores* in the report (``_with_scores``); the generated texts stay the real ones.
"""

from __future__ import annotations

import json
import subprocess
import urllib.request

import mlflow
import pytest

from flows.cli import main as cli
from qlora.config.schema import RegistryConfig, TrackingConfig
from qlora.tracking.runs import start_run
from registry import aliases
from registry.gate import decide, eval_set_fingerprint, paired_bootstrap
from registry.register import ConsumerCheckError, register_adapter
from tests.registry_fixtures import MLFLOW, free_port, mlflow_server, stop, subprocess_env, trained, wait_http  # noqa: F401

NAME = "tiny-registry"
PROMPT = "Reverse the order of these words: apple river stone"


def _run(url):
    return start_run(TrackingConfig(uri=url, experiment_name="registry-test"), run_name="t",
                     tags={"config_hash": "cafe0123", "prefect.flow_run_id": "0b5e-flow-run"})


def _with_scores(report, base: float, tuned: float):
    """Exact match is the gate metric here (registry.gate_metric=auto: the demo's answers are 3 words)."""
    return report.model_copy(update={"samples": [s | {"base_exact_match": base, "tuned_exact_match": tuned} for s in report.samples]})


# ------------------------------------------------------------------ the gate, as a function


def test_paired_bootstrap_interval():
    cfg = RegistryConfig()
    assert paired_bootstrap([1.0] * 50, [0.0] * 50, 500, 0.95) == (1.0, 1.0, 1.0)
    mean, lo, hi = paired_bootstrap([1, 0] * 25, [0, 0] * 25, 2000, 0.95)
    assert mean == 0.5 and 0.3 < lo < 0.5 < hi < 0.7
    # one win in six is noise: the interval reaches 0, so no promotion
    d = decide([1, 0, 0, 0, 0, 0], [0] * 6, "base", cfg, "x")
    assert not d.promote and d.ci_low == 0.0 and d.n == 6
    assert decide([1, 0] * 25, [0] * 50, "base", cfg, "x").promote
    assert not decide([1, 0] * 25, [0] * 50, "base", cfg.model_copy(update={"min_improvement": 0.5}), "x").promote
    # a champion without scores on this eval set is not comparable
    assert not decide([1] * 6, None, "champion v1", cfg, "x").promote
    with pytest.raises(ValueError):
        paired_bootstrap([1.0], [1.0, 0.0], 100, 0.95)


# ------------------------------------------------------------------ registration on a real server


@pytest.fixture(scope="module")
def registered(trained, mlflow_server):
    """v1: real scores (tuned == base at 0 exact match on a 4-step adapter): stays challenger.
    v2: scores say tuned beats base on every prompt: promoted. v3: same scores as v2: not better than champion v2."""
    base, adapter, report = trained
    cfg = RegistryConfig(model_name=NAME, bootstrap_resamples=500)
    runs, versions = [], []
    for i, r in enumerate((report, _with_scores(report, 0.0, 1.0), _with_scores(report, 0.0, 1.0))):
        runs.append(_run(mlflow_server))
        # the consumer check (a model load) runs on v2, the version that gets promoted; v1 and v3 skip it for time
        c = cfg if i == 1 else cfg.model_copy(update={"consumer_check_prompts": 0})
        versions.append(register_adapter(base, adapter, r, c, runs[-1]))
    return versions, runs, mlflow.MlflowClient(mlflow_server)


def test_gate_moves_champion_only_on_evidence(registered):
    (v1, v2, v3), _, client = registered
    assert [int(v.version) for v in (v1, v2, v3)] == [1, 2, 3]
    assert v1.aliases == ["challenger"] and "exact_match vs base: +0.000 on n=6" in v1.decision
    assert v2.aliases == ["challenger", "champion"] and "vs base: +1.000" in v2.decision
    assert v3.aliases == ["challenger"] and "vs champion v2: +0.000" in v3.decision
    assert int(client.get_model_version_by_alias(NAME, "champion").version) == 2
    assert int(client.get_model_version_by_alias(NAME, "challenger").version) == 3
    assert aliases.history(client, NAME) == ["2"]


def test_every_version_carries_lineage(registered, trained):
    (v1, v2, _), runs, client = registered
    base, adapter, report = trained
    mv = client.get_model_version(NAME, v2.version)
    t = mv.tags
    assert t["base.fingerprint"] == base.fingerprint and t["base.name_or_path"] == base.base
    assert json.loads(t["quantization"])["bnb_4bit_quant_type"] == "nf4"
    assert json.loads(t["lora"])["r"] == 8
    assert t["data.fingerprint"] == report.data.fingerprint and t["data.train_rows"] == str(report.data.train_rows)
    assert t["config_hash"] == "cafe0123" and t["prefect.flow_run_id"] == "0b5e-flow-run"
    assert t["mlflow_run_id"] == runs[1].run_id == mv.run_id
    assert len(t["git_commit"].split("-")[0]) == 40
    assert set(json.loads(t["libraries"])) >= {"torch", "transformers", "peft", "bitsandbytes", "mlflow", "prefect"}
    assert float(t["eval/tuned/loss"]) == pytest.approx(report.metrics["eval/tuned/loss"], rel=1e-5)
    ev = json.loads(t["promotion.evidence"])
    assert ev["promote"] and ev["n"] == 6 and ev["ci_low"] == 1.0 and ev["eval_set"] == eval_set_fingerprint(report.samples)
    assert "| exact_match |" in mv.description and "promoted to champion" in mv.description
    # the decision is in the run too, with the per-example scores the next gate compares against
    m = client.get_run(runs[1].run_id).data.metrics
    assert m["gate/promote"] == 1.0 and m["gate/n"] == 6 and m["gate/ci_low"] == 1.0
    arts = [a.path for a in client.list_artifacts(runs[1].run_id, "registry/scores")]
    assert sorted(arts) == [f"registry/scores/{ev['eval_set']}.{m}.json" for m in ("exact_match", "rouge")]
    assert ev["metric"] == "exact_match" and "gate metric: exact_match" in mv.description
    assert client.get_model_version(NAME, v1.version).tags["promotion"] == "kept as challenger"
    # the logged model: signature with params, an input example, pinned requirements
    logged = mlflow.models.Model.load(f"models:/{NAME}/{v2.version}")
    assert {p.name for p in logged.signature.params.params} == {
        "max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "stop_sequence"}
    assert logged.saved_input_example_info is not None
    reqs = mlflow.pyfunc.get_model_dependencies(f"models:/{NAME}/{v2.version}")
    pins = [line for line in open(reqs).read().splitlines() if line and not line.startswith("#")]
    assert pins and all("==" in p for p in pins)


def test_consumer_check_failure_keeps_only_challenger(trained, mlflow_server):
    """A lost template: evaluation rendered the row as the bare message, the registered model applies the training
    template, so a consumer gets another answer. Evaluation's batched answer is not the reference (it may differ
    by batch numerics alone): a report whose recorded answer differs, prompt intact, passes the check."""
    base, adapter, report = trained
    numerics = _with_scores(report, 0.0, 1.0)
    numerics.samples[0]["tuned"] = "what a batch of bf16 prompts answered"
    ok = register_adapter(base, adapter, numerics, RegistryConfig(model_name="tiny-numerics", bootstrap_resamples=200),
                          _run(mlflow_server))
    assert ok.consumer_checked == 3 and "champion" in ok.aliases

    tampered = _with_scores(report, 0.0, 1.0)
    tampered.samples[0]["prompt"] = tampered.samples[0]["message"]
    cfg = RegistryConfig(model_name="tiny-broken", bootstrap_resamples=200)
    with pytest.raises(ConsumerCheckError, match=r"models:/tiny-broken/1 it does not generate what the evaluated model generated: "
                                                 r"prompt 'Reverse the order"):
        register_adapter(base, adapter, tampered, cfg, _run(mlflow_server))
    client = mlflow.MlflowClient(mlflow_server)
    assert client.get_registered_model("tiny-broken").aliases == {"challenger": "1"}
    assert client.get_model_version("tiny-broken", 1).tags["promotion.reason"].startswith("consumer check failed")


# ------------------------------------------------------------------ consumers


def test_pyfunc_returns_only_generated_text_and_honours_params(registered, trained):
    _, _, client = registered
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    long = model.predict([PROMPT, "Reverse the order of these words: lamp tiger music"], params={"max_new_tokens": 5})
    short = model.predict([PROMPT], params={"max_new_tokens": 1})
    assert len(long) == 2 and all(isinstance(o, str) for o in long)
    assert not any("### Instruction" in o or PROMPT in o for o in long)  # the prompt is not echoed
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(trained[1].path)
    # exactly one new token: its text is one vocabulary entry's (a byte-level piece may not re-encode to itself)
    assert short[0] in {t.decode([i], skip_special_tokens=True) for i in range(len(t))}
    assert long[0].strip().startswith(short[0].strip())  # greedy: a 1-token answer is the 5-token answer's prefix


def test_cli_registry_commands(registered, mlflow_server, capsys):
    _, _, client = registered
    uri = ["--tracking-uri", mlflow_server]
    assert cli(["registry", "list", NAME, *uri]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split()[0] for ln in lines] == ["v3", "v2", "v1"]
    assert "champion" in lines[1] and "challenger" in lines[0] and "kept as challenger" in lines[2]
    assert "exact_match base " in lines[0]  # the metric its gate compared (the demo's short answers)

    assert cli(["promote", NAME, "1", "--why", "looks better on spot checks", "--by", "alice", *uri]) == 0
    t = client.get_model_version(NAME, 1).tags
    assert int(client.get_model_version_by_alias(NAME, "champion").version) == 1
    assert t["champion.by"] == "alice" and "looks better on spot checks" in t["champion.why"]

    assert cli(["rollback", NAME, "--why", "v1 regressed", "--by", "bob", *uri]) == 0
    assert int(client.get_model_version_by_alias(NAME, "champion").version) == 2
    assert "bob" in client.get_model_version(NAME, 1).tags["rolled_back"]
    assert "rollback from v1" in client.get_model_version(NAME, 2).tags["champion.why"]
    assert cli(["rollback", NAME, *uri]) == 1  # history is [2]: nothing earlier to go back to
    assert "no previous champion" in capsys.readouterr().err
    assert cli(["promote", NAME, "99", "--why", "x", *uri]) == 1

    assert cli(["predict", f"models:/{NAME}@champion", PROMPT, "--max-new-tokens", "2", "--temperature", "0", *uri]) == 0
    assert capsys.readouterr().out.strip() != ""


@pytest.mark.slow  # `mlflow models serve` subprocess: ~12 s
def test_mlflow_models_serve_answers_invocations(registered, mlflow_server, tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(
        [MLFLOW, "models", "serve", "-m", f"models:/{NAME}@champion", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env=subprocess_env(MLFLOW_TRACKING_URI=mlflow_server),
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", proc, timeout=180)
        body = json.dumps({"inputs": [PROMPT], "params": {"max_new_tokens": 3}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = json.loads(r.read())
    except Exception:
        raise AssertionError(log.read_text()[-3000:])
    finally:
        stop(proc)
    preds = answer["predictions"]
    assert len(preds) == 1 and isinstance(preds[0], str) and "### Instruction" not in preds[0]
    local = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict([PROMPT], params={"max_new_tokens": 3})
    assert preds == list(local)  # the server generates what an in-process consumer gets


# ------------------------------------------------------------------ human approval (runs last: it moves champion)


def test_require_approval_pauses_until_approved(registered, trained, mlflow_server, prefect_server):
    import threading
    import time

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.flow_runs import resume_flow_run

    from flows.approval import await_approval

    base, adapter, report = trained
    _, _, client = registered
    champion_before = client.get_model_version_by_alias(NAME, "champion").version
    cfg = RegistryConfig(model_name=NAME, bootstrap_resamples=200, require_approval=True, consumer_check_prompts=0)
    run = _run(mlflow_server)
    # a fresh name: no champion, so the gate compares with the base (scores say tuned wins everywhere)
    v = register_adapter(base, adapter, _with_scores(report, 0.0, 1.0), cfg.model_copy(update={"model_name": "tiny-approve"}), run)
    assert v.awaiting_approval and v.aliases == ["challenger"]  # gate passed, champion held back
    assert aliases.current(client, "tiny-approve", "champion") is None

    @flow(name="approval-under-test")
    def approve(version, reg, mlrun):
        return await_approval(version, reg, mlrun)

    out = []
    t = threading.Thread(target=lambda: out.append(approve(v, cfg, run, return_state=True)))
    t.start()
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as pc:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            runs = [r for r in pc.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["approval-under-test"])))
                    if r.state and r.state.is_paused()]  # this test's flow: the Prefect server may be shared
            if runs:
                break
            time.sleep(0.5)
        assert runs, "the flow never paused"
        assert aliases.current(client, "tiny-approve", "champion") is None  # nothing moves while paused
        resume_flow_run(runs[0].id, run_input={"approve": True, "approver": "carol", "reason": "reviewed samples"})
    t.join(120)
    state = out[0]
    assert state.is_completed(), state.message
    assert int(client.get_model_version_by_alias("tiny-approve", "champion").version) == int(v.version)
    tags = client.get_model_version("tiny-approve", v.version).tags
    assert tags["champion.by"] == "carol" and "reviewed samples" in tags["champion.why"]
    assert client.get_model_version_by_alias(NAME, "champion").version == champion_before


def test_register_merged_is_a_plain_full_precision_model(trained, mlflow_uri, tmp_path):
    import bitsandbytes as bnb
    import torch
    from safetensors.torch import load_file

    base, adapter, report = trained
    run = start_run(TrackingConfig(uri=mlflow_uri, artifact_location=str(tmp_path / "art")), run_name="merged")
    cfg = RegistryConfig(model_name="mrg", register_merged=True, consumer_check_prompts=0)
    v = register_adapter(base, adapter, report, cfg, run)
    client = mlflow.MlflowClient(mlflow_uri)
    mv = client.get_model_version("mrg-merged", "1")
    assert mv.tags["adapter_version"] == v.version
    assert set(mv.aliases) == set(v.aliases)

    comps = mlflow.transformers.load_model("models:/mrg-merged/1", return_type="components")
    model = comps["model"]
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert not any("lora_" in n for n, _ in model.named_parameters())
    # the adapter's delta is in the weights: they differ from the original base's
    original = load_file(f"{base.base}/model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    merged_w = dict(model.named_parameters())[key].detach().float()
    assert not torch.allclose(merged_w, original[key].float(), atol=1e-4)
    # and consumers call it like the adapter version: raw message in, generated text out
    out = mlflow.pyfunc.load_model("models:/mrg-merged/1").predict(
        ["Reverse the order of these words: apple river stone"], params={"max_new_tokens": 3})
    assert len(out) == 1 and isinstance(out[0], str)
    # a re-run of the register task for the same run adds no second merged version
    register_adapter(base, adapter, report, cfg, run)
    assert len(client.search_model_versions("name = 'mrg-merged'")) == 1


def test_register_logs_the_model_evaluate_loaded_then_releases_it(trained, mlflow_server, caplog):
    """In one process (a flow run) the register stage reuses the evaluate stage's loaded model instead of
    loading the 4-bit base and adapter again, and frees it once logged."""
    import logging

    from qlora.config.schema import EvalConfig
    from qlora.models import ModelCache
    from registry.register import log_adapter
    from tasks.evaluate import evaluate_adapter

    base, adapter, report = trained
    models = ModelCache()
    evaluate_adapter(base, adapter, report.data, EvalConfig(max_samples=2, max_new_tokens=3, batch_size=2), models=models)
    assert models.holds == (base.path, adapter.path)
    with caplog.at_level(logging.INFO, logger="qlora.loading"):
        info = log_adapter(base, adapter, _run(mlflow_server), models=models)
    assert "reusing the tuned model loaded earlier in this run" in caplog.text
    assert models.holds is None and info.model_uri


def _versions(mlflow_uri, tmp_path, name, n):
    client = mlflow.MlflowClient(mlflow_uri)
    client.create_registered_model(name)
    for i in range(1, n + 1):
        client.create_model_version(name, source=str(tmp_path / f"v{i}"))
    return client


class _Interleaved:
    """The real client, except that ``other()`` (another writer) runs just before our first call of ``method``."""

    def __init__(self, client, method, other):
        self.client, self.method, self.other = client, method, other

    def __getattr__(self, attr):
        real = getattr(self.client, attr)
        if attr != self.method or self.other is None:
            return real

        def first_call(*a, **kw):
            other, self.other = self.other, None
            other()
            return real(*a, **kw)
        return first_call


def _champion(client, name):
    return str(client.get_model_version_by_alias(name, "champion").version)


def test_champion_alias_ends_on_the_history_top_when_promotions_interleave(mlflow_uri, tmp_path):
    """The CI failure this replaces a read-modify-write history for: writer A records its promotion and
    reads the history's top (A); writer B records, sets and settles the alias on B; then A's stale alias
    write lands. A must re-read and move the alias to B, and neither promotion may be lost."""
    client = _versions(mlflow_uri, tmp_path, "race", 3)
    client.set_registered_model_tag("race", aliases.HISTORY, '["1"]')  # an earlier release's JSON history is kept
    b = lambda: aliases.set_champion(client, "race", "3", who="writer B", why="test")  # noqa: E731
    got = aliases.set_champion(_Interleaved(client, "set_registered_model_alias", b), "race", "2", who="writer A", why="test")
    assert got == "3" and _champion(client, "race") == "3"
    assert aliases.history(client, "race") == ["1", "2", "3"]
    assert client.get_model_version("race", "2").tags["champion.by"] == "writer A"
    # A retried promotion is one entry, and rollback pops it.
    assert aliases.set_champion(client, "race", "3", who="retry", why="test") == "3"
    assert aliases.history(client, "race") == ["1", "2", "3"]
    assert aliases.rollback(client, "race", why="test", who="bob") == ("3", "2")
    assert aliases.history(client, "race") == ["1", "2"] and _champion(client, "race") == "2"


def test_rollback_racing_a_promotion_is_applied_in_event_order(mlflow_uri, tmp_path):
    """A promotion recorded after the rollback: the rollback counts, then the promotion. A promotion recorded
    between the rollback's read and its record: the rollback is stale, changes nothing and says so."""
    client = _versions(mlflow_uri, tmp_path, "race-rb", 3)
    for v in ("1", "2"):
        aliases.set_champion(client, "race-rb", v, who="gate", why="test")
    promote3 = lambda: aliases.set_champion(client, "race-rb", "3", who="gate", why="landed meanwhile")  # noqa: E731
    # the promotion's record lands while the rollback's own record is being written (its key is older)
    assert aliases.rollback(_Interleaved(client, "set_registered_model_tag", promote3), "race-rb", why="t", who="bob") == ("2", "1")
    assert aliases.history(client, "race-rb") == ["1", "3"] and _champion(client, "race-rb") == "3"
    assert "bob" in client.get_model_version("race-rb", "2").tags["rolled_back"]

    promote2 = lambda: aliases.set_champion(client, "race-rb", "2", who="gate", why="landed meanwhile")  # noqa: E731
    with pytest.raises(aliases.RegistryError, match="champion moved to v2 while rolling back from v3"):
        aliases.rollback(_Interleaved(client, "get_model_version_by_alias", promote2), "race-rb", why="t", who="eve")
    assert aliases.history(client, "race-rb") == ["1", "3", "2"] and _champion(client, "race-rb") == "2"
    assert "rolled_back" not in client.get_model_version("race-rb", "3").tags


def test_challenger_never_goes_back_when_registrations_interleave(mlflow_uri, tmp_path):
    client = _versions(mlflow_uri, tmp_path, "race-ch", 1)

    def newer_version_registers():
        client.create_model_version("race-ch", source=str(tmp_path / "v2"))
        aliases.set_challenger(client, "race-ch", "2")
    # v1's writer has read "newest is 1" when v2 is registered and takes the alias; v1's write lands late.
    aliases.set_challenger(_Interleaved(client, "set_registered_model_alias", newer_version_registers), "race-ch", "1")
    assert str(client.get_model_version_by_alias("race-ch", "challenger").version) == "2"


def test_alias_write_that_loses_the_insert_race_is_retried(mlflow_uri, tmp_path):
    """MLflow creates an alias row as select-then-insert: two writers creating it at once make one fail on
    the primary key (PostgreSQL says UniqueViolation). The loser writes again; other errors are not swallowed."""
    client = _versions(mlflow_uri, tmp_path, "race-pk", 2)

    class LosesTheRace:
        def __init__(self, error):
            self.error = error

        def __getattr__(self, attr):
            return getattr(client, attr)

        def set_registered_model_alias(self, name, alias, version):
            if self.error:
                client.set_registered_model_alias(name, alias, "1")  # the other writer's row lands first
                e, self.error = self.error, None
                raise mlflow.exceptions.MlflowException(e)
            return client.set_registered_model_alias(name, alias, version)

    race = 'duplicate key value violates unique constraint "registered_model_aliases_pk" (UniqueViolation)'
    assert aliases.set_champion(LosesTheRace(race), "race-pk", "2", who="gate", why="test") == "2"
    assert _champion(client, "race-pk") == "2"
    with pytest.raises(mlflow.exceptions.MlflowException, match="RESOURCE_DOES_NOT_EXIST"):
        aliases.set_champion(LosesTheRace("RESOURCE_DOES_NOT_EXIST"), "race-pk", "1", who="gate", why="test")
