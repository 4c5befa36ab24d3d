"""The bridge's refusals and its one acceptance, through its real app (Starlette's TestClient) emitting to a
real Prefect API (the test harness): a forged signature, a stale timestamp, a replayed delivery (also after a
restart) and an oversized body get 4xx and emit nothing; a good delivery becomes one Prefect event. And the
project's own event: every move of champion registry/aliases.py makes is one ``qlora.champion.moved``."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from starlette.testclient import TestClient

from flows.events import app as bridge_app
from registry.events import (
    CHAMPION_MOVED,
    MAX_AGE_S,
    Rejected,
    SeenDeliveries,
    champion_moved,
    create_app,
    signature,
    translate,
    verify,
)
from registry.webhooks import webhook_url

SECRET = "s3cret-for-tests-0123456789"


def delivery(name="tiny-events", alias="champion", version="3", secret=SECRET, stamp=None, delivery_id=None, body=None):
    """Headers and body exactly as mlflow/webhooks/delivery.py builds them."""
    body = body if body is not None else json.dumps({"entity": "model_version_alias", "action": "created",
                                                     "timestamp": "2026-01-01T00:00:00+00:00",
                                                     "data": {"name": name, "alias": alias, "version": version}}).encode()
    delivery_id = delivery_id or str(uuid.uuid4())
    stamp = str(int(time.time()) if stamp is None else stamp)
    return {"X-MLflow-Delivery-Id": delivery_id, "X-MLflow-Timestamp": stamp, "Content-Type": "application/json",
            "X-MLflow-Signature": signature(secret, delivery_id, stamp, body)}, body


def test_signature_is_mlflows():
    from mlflow.webhooks.delivery import _generate_hmac_signature

    assert signature(SECRET, "d-1", "1700000000", b'{"a": 1}') == _generate_hmac_signature(SECRET, "d-1", "1700000000", '{"a": 1}')


def test_verify_refuses_forged_stale_and_malformed():
    h, body = delivery()
    assert verify(h, body, SECRET)[1]["data"]["alias"] == "champion"
    with pytest.raises(Rejected, match="signature") as e:
        verify(h, body, "another-secret-0123456789")
    assert e.value.status == 401
    with pytest.raises(Rejected, match="signature"):
        verify(h, body.replace(b'"3"', b'"4"'), SECRET)  # tampered body
    h, body = delivery(stamp=int(time.time()) - MAX_AGE_S - 5)
    with pytest.raises(Rejected, match="stale") as e:
        verify(h, body, SECRET)
    assert e.value.status == 401
    h, body = delivery(body=b"not json")
    with pytest.raises(Rejected, match="not an MLflow webhook payload"):
        verify(h, body, SECRET)
    with pytest.raises(Rejected, match="missing"):
        verify({}, body, SECRET)


def test_translate_names_model_version_and_alias():
    ev = translate("d-1", {"entity": "model_version_alias", "action": "created",
                           "data": {"name": "m", "alias": "champion", "version": "7"}})
    assert ev.event == "mlflow.model_version_alias.created"
    assert ev.resource == {"prefect.resource.id": "mlflow.registered_model.m", "prefect.resource.name": "m",
                           "mlflow.model.name": "m", "mlflow.model.version": "7", "mlflow.model.alias": "champion"}
    assert ev.related[0]["prefect.resource.id"] == "mlflow.model_version.m.7" and ev.id == "d-1"


def test_seen_deliveries_survive_a_restart(tmp_path):
    seen = SeenDeliveries(tmp_path / "d.sqlite")
    assert seen.claim("a") and not seen.claim("a")
    seen.release("a")
    assert seen.claim("a")
    assert not SeenDeliveries(tmp_path / "d.sqlite").claim("a")  # a new process reads the same file
    assert SeenDeliveries(tmp_path / "d.sqlite").claim("a", now=time.time() + 3 * MAX_AGE_S)  # pruned once stale anyway


def _events(resource_id: str) -> list[dict]:
    from prefect.client.orchestration import get_client

    flt = {"filter": {"resource": {"id": [resource_id]}, "occurred": {"since": "2020-01-01T00:00:00Z"}}, "limit": 50}
    with get_client(sync_client=True) as c:
        r = c.request("POST", "/events/filter", json=flt)
        r.raise_for_status()
        return r.json()["events"]


def test_bridge_emits_only_good_deliveries(prefect_server, tmp_path, caplog):
    name = f"tiny-events-{uuid.uuid4().hex[:8]}"
    client = TestClient(bridge_app(SECRET, tmp_path))
    url = webhook_url("http://testserver", name)[len("http://testserver"):]
    caplog.set_level("INFO", logger="qlora.events")

    h, body = delivery(name=name, secret="forged-secret-0123456789")
    assert client.post(url, content=body, headers=h).status_code == 401
    h, body = delivery(name=name, stamp=int(time.time()) - 3600)
    assert client.post(url, content=body, headers=h).status_code == 401
    h, body = delivery(name=name)
    big = body + b" " * (10 * 1024 * 1024)  # 10 MB: refused by its Content-Length, before it is read
    assert client.post(url, content=big, headers=h | {"X-MLflow-Signature": signature(SECRET, h["X-MLflow-Delivery-Id"],
                                                                                       h["X-MLflow-Timestamp"], big)}).status_code == 413

    def chunks():  # no Content-Length (chunked): refused once the stream passes the cap
        yield body
        for _ in range(160):
            yield b" " * 65536
    assert client.post(url, content=chunks(), headers=h).status_code == 413
    other_h, other = delivery(name="some-other-model")
    assert client.post(url, content=other, headers=other_h).status_code == 202  # another model's webhook: dropped

    ok = client.post(url, content=body, headers=h)
    assert ok.status_code == 200, ok.text
    assert ok.json() == {"emitted": "mlflow.model_version_alias.created", "id": h["X-MLflow-Delivery-Id"]}
    assert client.post(url, content=body, headers=h).status_code == 409  # replay
    restarted = TestClient(bridge_app(SECRET, tmp_path))  # same state dir: the id is remembered
    assert restarted.post(url, content=body, headers=h).status_code == 409

    deadline = time.monotonic() + 30  # the server persists events in batches
    while not (got := _events(f"mlflow.registered_model.{name}")) and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(1)
    got = _events(f"mlflow.registered_model.{name}")
    assert [(e["id"], e["event"], e["resource"]["mlflow.model.version"]) for e in got] == \
        [(h["X-MLflow-Delivery-Id"], "mlflow.model_version_alias.created", "3")]
    logged = caplog.text
    assert SECRET not in logged and "2026-01-01T00:00:00" not in logged  # no secret, no raw body


def test_emit_failure_releases_the_delivery(tmp_path):
    calls = []

    def down(event):
        calls.append(event.id)
        if len(calls) == 1:
            raise ConnectionError("prefect down")

    client = TestClient(create_app(SECRET, SeenDeliveries(tmp_path / "d.sqlite"), down))
    h, body = delivery()
    assert client.post("/mlflow", content=body, headers=h).status_code == 503
    assert client.post("/mlflow", content=body, headers=h).status_code == 200  # MLflow's retry of the same delivery
    assert calls == [h["X-MLflow-Delivery-Id"]] * 2


def test_register_webhook_is_idempotent(mlflow_uri, monkeypatch):
    import mlflow

    from registry.webhooks import EVENTS, register_webhook

    monkeypatch.setenv("MLFLOW_WEBHOOK_ALLOWED_SCHEMES", "http,https")  # a laptop bridge on http://127.0.0.1
    monkeypatch.setenv("MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS", "true")
    client = mlflow.MlflowClient(mlflow_uri)
    first, created = register_webhook(client, "m1", "http://127.0.0.1:8765", SECRET)
    again, created_again = register_webhook(client, "m1", "http://127.0.0.1:9999/", SECRET)
    other, _ = register_webhook(client, "m2", "http://127.0.0.1:8765", SECRET)
    hooks = {w.name: w for w in client.list_webhooks()}
    assert (created, created_again, first == again, other != first) == (True, False, True, True)
    assert set(hooks) == {"qlora-bridge-m1", "qlora-bridge-m2"}
    assert hooks["qlora-bridge-m1"].url == "http://127.0.0.1:9999/mlflow?model=m1"
    assert {str(e) for e in hooks["qlora-bridge-m1"].events} == set(EVENTS)


def _settled_events(resource_id: str, n: int) -> list[dict]:
    deadline = time.monotonic() + 30  # the server persists events in batches
    while len(_events(resource_id)) < n and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(1)  # and nothing more comes
    return sorted(_events(resource_id), key=lambda e: e["occurred"])


def test_each_champion_move_is_announced_once(prefect_server, mlflow_uri, tmp_path):
    """Before: the flow posted a promotion from its report task only; `qlora promote` and `qlora rollback` told
    nobody. Now every move is an event on the Prefect server, except the register task's retry of a move made."""
    import mlflow

    from registry import aliases

    name = f"tiny-moves-{uuid.uuid4().hex[:8]}"
    client = mlflow.MlflowClient(mlflow_uri)
    client.create_registered_model(name)
    for i in (1, 2):
        client.create_model_version(name, source=str(tmp_path / f"v{i}"))
    aliases.set_champion(client, name, "1", "promotion gate", "beats the base")
    aliases.set_champion(client, name, "1", "promotion gate", "beats the base")  # the register task's retry
    aliases.promote(client, name, "2", "better on the new data", who="ann")
    aliases.rollback(client, name, "v2 regressed", who="bob")
    got = _settled_events(f"mlflow.registered_model.{name}", 3)
    assert {e["event"] for e in got} == {CHAMPION_MOVED}
    assert [(e["resource"]["mlflow.model.version"], e["payload"]["previous"], e["payload"]["by"], e["payload"]["why"])
            for e in got] == [("1", None, "promotion gate", "beats the base"),
                              ("2", "1", "ann", "manual: better on the new data"),
                              ("1", "2", "bob", "rollback from v2: v2 regressed")]
    assert got[0]["resource"]["mlflow.model.alias"] == "champion"


def test_without_a_prefect_server_nothing_is_announced_and_nothing_starts(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from registry import events

    monkeypatch.setattr(events, "emit_to_prefect", lambda e: pytest.fail("no server to send to"))
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert events.announce(champion_moved("m", "1", None, "x", "y")) is False
