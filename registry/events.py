"""The MLflow -> Prefect bridge: verify a signed MLflow webhook delivery and translate it into a Prefect event.

MLflow (>= 3.3) POSTs a JSON body ``{"entity", "action", "timestamp", "data"}`` with three headers:
``X-MLflow-Delivery-Id`` (a UUID), ``X-MLflow-Timestamp`` (Unix seconds) and ``X-MLflow-Signature``:
``v1,<base64 HMAC-SHA256 of "{delivery_id}.{timestamp}.{body}">`` keyed with the webhook's secret
(``mlflow/webhooks/delivery.py``). A delivery is accepted only when the signature matches, the
timestamp is within ``MAX_AGE_S`` of now, the delivery id was never accepted before (``SeenDeliveries``,
a SQLite file, so a restart forgets nothing) and the body is at most ``MAX_BODY_BYTES``. Anything else is
a 4xx and emits nothing. The secret and raw bodies are never logged; a rejection logs its reason only.

Plain functions and a Starlette app (Starlette and uvicorn come with Prefect's server); ``emit`` is passed
in, so this module needs no Prefect server and the app is tested with Starlette's TestClient.

The same vocabulary names the project's own event ``qlora.champion.moved``: ``registry/aliases.py`` announces
each move of ``champion`` it makes (``announce``), so the notification automation (``flows/notifications.py``)
hears of a promotion with or without the bridge running.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

log = logging.getLogger("qlora.events")

SIGNATURE_HEADER, TIMESTAMP_HEADER, DELIVERY_HEADER = "x-mlflow-signature", "x-mlflow-timestamp", "x-mlflow-delivery-id"
MAX_AGE_S = 300  # 5 minutes: older (or further in the future) deliveries are refused as possible replays
MAX_BODY_BYTES = 64 * 1024  # an alias or tag event is < 1 KB; a model version with long tags stays far below this
RESOURCE_PREFIX = "mlflow.registered_model."  # prefect.resource.id = mlflow.registered_model.<name>
# Entities the bridge forwards (the registered-model side of MLflow's events; prompts are not models).
FORWARDED = {"model_version", "model_version_alias", "model_version_tag", "registered_model"}
CHAMPION_MOVED = "qlora.champion.moved"  # emitted by the process that moved the alias (not by MLflow)


class Rejected(Exception):
    """A delivery the bridge refuses; ``status`` is the HTTP answer (4xx), the message says why (never the body)."""

    def __init__(self, status: int, why: str):
        super().__init__(why)
        self.status = status


def signature(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """MLflow's ``v1,<base64 HMAC-SHA256>`` over ``{delivery_id}.{timestamp}.{body}``."""
    mac = hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def verify(headers: dict[str, str], body: bytes, secret: str, now: float | None = None) -> tuple[str, dict]:
    """(delivery id, parsed body) of a delivery whose signature and timestamp hold; ``Rejected`` otherwise.

    The signature is checked before the timestamp is trusted (an attacker cannot make a stale delivery fresh
    without the secret) and compared in constant time."""
    h = {k.lower(): v for k, v in headers.items()}
    delivery, stamp, sig = h.get(DELIVERY_HEADER), h.get(TIMESTAMP_HEADER), h.get(SIGNATURE_HEADER)
    if not (delivery and stamp and sig):
        raise Rejected(401, "missing X-MLflow-Signature / X-MLflow-Timestamp / X-MLflow-Delivery-Id")
    if not hmac.compare_digest(sig.encode(), signature(secret, delivery, stamp, body).encode()):
        raise Rejected(401, "signature does not match the webhook secret")
    try:
        age = (time.time() if now is None else now) - int(stamp)
    except ValueError:
        raise Rejected(400, "X-MLflow-Timestamp is not Unix seconds") from None
    if abs(age) > MAX_AGE_S:
        raise Rejected(401, f"timestamp {age:.0f} s away from now (limit {MAX_AGE_S} s): stale or replayed")
    try:
        payload = json.loads(body)
        payload["entity"], payload["action"], payload["data"]["name"]  # noqa: B018 (shape check)
    except (ValueError, KeyError, TypeError):
        raise Rejected(400, "body is not an MLflow webhook payload (entity, action, data.name)") from None
    return delivery, payload


@dataclass(frozen=True)
class PrefectEvent:
    """What the bridge emits: the arguments of ``prefect.events.emit_event`` (and of its events API)."""

    event: str
    resource: dict[str, str]
    related: list[dict[str, str]]
    payload: dict
    id: str  # the MLflow delivery id: the same delivery is the same event

    def as_json(self, occurred: str) -> dict:
        return {"event": self.event, "resource": self.resource, "related": self.related, "payload": self.payload,
                "id": self.id, "occurred": occurred}


def _model_resources(name: str, **labels) -> tuple[dict[str, str], list[dict[str, str]]]:
    """Resource ``mlflow.registered_model.<name>`` with labels ``mlflow.model.<label>`` (what triggers match on and
    what deployment parameters are templated from), and the version, when there is one, as a related resource."""
    resource = {"prefect.resource.id": RESOURCE_PREFIX + name, "prefect.resource.name": name, "mlflow.model.name": name}
    resource |= {f"mlflow.model.{k}": str(v) for k, v in labels.items() if v is not None}
    version = labels.get("version")
    related = [] if version is None else [{"prefect.resource.id": f"mlflow.model_version.{name}.{version}",
                                           "prefect.resource.role": "model-version", "mlflow.model.version": str(version)}]
    return resource, related


def translate(delivery_id: str, payload: dict) -> PrefectEvent:
    """``model_version_alias.created`` for ``champion`` on v3 of ``qlora-demo`` becomes event
    ``mlflow.model_version_alias.created`` on resource ``mlflow.registered_model.qlora-demo`` with labels
    ``mlflow.model.name``, ``mlflow.model.version``, ``mlflow.model.alias``, and the version as a related resource."""
    data = payload["data"]
    name = str(data["name"])
    resource, related = _model_resources(name, **{k: data.get(k) for k in ("version", "alias", "key")})
    # The payload keeps MLflow's data but not free text (descriptions) or tag values that may hold secrets.
    kept = {k: v for k, v in data.items() if k in ("name", "version", "alias", "key", "source", "run_id")}
    return PrefectEvent(f"mlflow.{payload['entity']}.{payload['action']}", resource, related,
                        {"mlflow": kept, "mlflow_timestamp": payload.get("timestamp")}, delivery_id)


def champion_moved(name: str, version: str, previous: str | None, by: str, why: str) -> PrefectEvent:
    """``qlora.champion.moved``: the bridge's resource and labels for the same move (so one trigger matches both),
    and who moved it from which version, and why, in the payload."""
    resource, related = _model_resources(name, version=version, alias="champion")
    return PrefectEvent(CHAMPION_MOVED, resource, related, {"previous": previous, "by": by, "why": why[:500]},
                        str(uuid.uuid4()))


def emit_to_prefect(event: PrefectEvent) -> None:
    """Send one event to the Prefect API (``POST /api/events``, answered synchronously); raises when the API did
    not take it."""
    from datetime import datetime, timezone

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        r = client.request("POST", "/events", json=[event.as_json(datetime.now(timezone.utc).isoformat())])
        r.raise_for_status()


def announce(event: PrefectEvent) -> bool:
    """Best effort, for a move that has already happened: the event goes to the Prefect server ``PREFECT_API_URL``
    names; without one there is nobody to tell (Prefect would start a temporary server only to forget it), and a
    server that does not take it costs a warning, never the promotion. True when Prefect has it."""
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        return False
    try:
        emit_to_prefect(event)
        return True
    except Exception as e:  # noqa: BLE001 - the alias has moved; only the notification is lost
        log.warning("%s on %s: the Prefect API did not take the event (%s: %s); no notification is sent for it",
                    event.event, event.resource["prefect.resource.id"], type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
        return False


class SeenDeliveries:
    """Delivery ids already accepted, in a SQLite file: a replay is refused across bridge restarts too.

    Ids older than twice the timestamp window are pruned: a delivery that old is refused as stale anyway.
    ``claim`` reserves an id atomically (two copies of one delivery racing: one wins); ``release`` gives it
    back when emitting failed, so MLflow's retry of the same delivery is accepted."""

    def __init__(self, path: Path | str):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("CREATE TABLE IF NOT EXISTS seen (id TEXT PRIMARY KEY, at REAL NOT NULL)")
        self._lock = threading.Lock()

    def claim(self, delivery_id: str, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        with self._lock:
            self._db.execute("DELETE FROM seen WHERE at < ?", (now - 2 * MAX_AGE_S,))
            return self._db.execute("INSERT OR IGNORE INTO seen VALUES (?, ?)", (delivery_id, now)).rowcount == 1

    def release(self, delivery_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM seen WHERE id = ?", (delivery_id,))


async def _read_capped(request, limit: int) -> bytes:
    """The body, refused (413) as soon as it passes ``limit`` bytes: a 10 MB body is never held in memory."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Rejected(413, f"body of {declared} bytes is over the {limit}-byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Rejected(413, f"body over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(secret: str, seen: SeenDeliveries, emit: Callable[[PrefectEvent], None],
               max_body: int = MAX_BODY_BYTES, models: set[str] | None = None):
    """The bridge as an ASGI app: ``POST /mlflow?model=NAME`` takes deliveries, ``GET /health`` answers ``ok``.

    MLflow's webhooks fire for every registered model, so each webhook names its model in the query string and
    deliveries for other models are answered 202 and dropped (two models' webhooks would otherwise emit every
    event twice).

    ``emit`` sends one event to Prefect and raises when it could not (then the answer is 503 and the delivery id
    is released, so MLflow's retry goes through). ``models``: forward only these registered models."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    if not secret:
        raise ValueError("the bridge needs the webhook secret")

    async def receive(request):
        try:
            body = await _read_capped(request, max_body)
            delivery, payload = verify(dict(request.headers), body, secret)
            wanted = request.query_params.get("model")  # `qlora events register` makes one webhook per model
            name = payload["data"]["name"]
            if payload["entity"] not in FORWARDED or (wanted and name != wanted) or (models is not None and name not in models):
                return JSONResponse({"ignored": f"{payload['entity']} of {payload['data']['name']}"}, status_code=202)
            if not seen.claim(delivery):
                raise Rejected(409, "delivery id already accepted (replay)")
        except Rejected as e:
            log.warning("refused a delivery from %s: HTTP %d, %s", request.client.host if request.client else "?", e.status, e)
            return JSONResponse({"error": str(e)}, status_code=e.status)
        event = translate(delivery, payload)
        try:
            await run_in_threadpool(emit, event)
        except Exception as e:  # Prefect down or refusing: MLflow retries the delivery (3 times by default)
            seen.release(delivery)
            log.error("could not emit %s for delivery %s: %s", event.event, delivery, type(e).__name__)
            return JSONResponse({"error": "could not emit the Prefect event; retry"}, status_code=503)
        log.info("delivery %s -> %s %s", delivery, event.event, event.resource["prefect.resource.id"])
        return JSONResponse({"emitted": event.event, "id": event.id}, status_code=200)

    async def health(request):
        return PlainTextResponse("ok")

    return Starlette(routes=[Route("/mlflow", receive, methods=["POST"]), Route("/health", health, methods=["GET"])])
