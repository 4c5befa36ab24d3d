"""Alias moves that people and the gate make, each recorded in tags so the registry explains itself.

MLflow keeps no alias history, so without a record "the previous champion" would be unknowable. Each
move of ``champion`` (the gate's and ``qlora promote``'s promotions, ``qlora rollback``) is written as
its own registered-model tag ``champion_history/<time>-<id>``; replaying those events in key order gives
the champion history (a promotion pushes, a rollback pops). Each move that lands is also announced as the Prefect
event ``qlora.champion.moved`` (``registry/events.py``), which the notification automation listens for.

Several writers may promote at once (concurrent flow runs against one registry), and MLflow offers
no compare-and-swap: a single read-modify-write history tag loses entries and the alias can end up
pointing at a version the history does not end with. So events are append-only under distinct keys
(nothing to lose), and every writer, after appending, sets the alias to the history's newest entry and
re-reads until the two agree. Whoever writes the alias last has checked it against every event
appended before that write, and any writer appending later converges after it, so when all writers
are done the alias is the replayed history's top.
"""

from __future__ import annotations

import getpass
import json
import time
import uuid

from qlora.errors import UserError
from qlora.tracking.names import filter_literal
from registry.events import announce, champion_moved

CHAMPION, CHALLENGER = "champion", "challenger"
HISTORY = "champion_history"  # a JSON list of versions, written by earlier releases; read as the oldest events
EVENT = HISTORY + "/"
_SETTLE_ATTEMPTS = 20


class RegistryError(UserError):
    """A registry command asked for something the registry does not hold (unknown model, version, alias)."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _replay(tags: dict) -> tuple[list[str], set[str]]:
    """(champion versions oldest first, keys of the events that took effect)."""
    stack, applied = [str(v) for v in json.loads(tags.get(HISTORY, "[]"))], set()
    for key in sorted(k for k in tags if k.startswith(EVENT)):
        e = json.loads(tags[key])
        if e["op"] == "promote" and (not stack or stack[-1] != e["version"]):  # a retried promotion is one push
            stack.append(e["version"])
            applied.add(key)
        elif e["op"] == "rollback" and len(stack) > 1 and stack[-1] == e["from"]:  # stale if someone moved it since
            stack.pop()
            applied.add(key)
    return stack, applied


def history(client, name: str) -> list[str]:
    """Champion versions, oldest first; the last is the champion."""
    return _replay(client.get_registered_model(name).tags)[0]


def current(client, name: str, alias: str):
    """The version behind ``alias``, or None."""
    import mlflow

    try:
        return client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        return None


def _lost_insert_race(e: Exception) -> bool:
    """MLflow's SQL registry store writes a new alias as select-then-insert: two writers creating the same
    one at once make one fail on the primary key (PostgreSQL, concurrent test). History records cannot
    collide: each has its own key."""
    text = str(e)
    return any(s in text for s in ("UniqueViolation", "UNIQUE constraint failed", "duplicate key value"))


def _set_alias(client, name: str, alias: str, version: str) -> None:
    """``set_registered_model_alias``, once more if another writer created the alias row first (the retry
    finds the row and updates it)."""
    import mlflow

    try:
        client.set_registered_model_alias(name, alias, version)
    except mlflow.exceptions.MlflowException as e:
        if not _lost_insert_race(e):
            raise
        client.set_registered_model_alias(name, alias, version)


def _settle(client, name: str, alias: str, target) -> str:
    """Point ``alias`` at ``target(client, name)`` and re-read both until they agree (see the module doc)."""
    for _ in range(_SETTLE_ATTEMPTS):
        want = target(client, name)
        cur = current(client, name, alias)
        if cur is not None and str(cur.version) == want:
            return want
        _set_alias(client, name, alias, want)
    raise RegistryError(f"{name}: alias {alias!r} did not settle after {_SETTLE_ATTEMPTS} attempts while other writers "
                        f"kept moving it; check `qlora registry list {name}` and re-run the promotion if needed")


def _newest(client, name: str) -> str:
    return str(max(int(m.version) for m in client.search_model_versions(f"name = {filter_literal(name)}")))


def set_challenger(client, name: str, version: str) -> None:
    """``challenger`` -> the newest version, which ``version`` (just registered) usually is. With
    concurrent registrations each writer settles the alias on the newest, so it never goes backwards."""
    _settle(client, name, CHALLENGER, _newest)


def _top(client, name: str) -> str:
    return history(client, name)[-1]


def _append(client, name: str, event: dict) -> str:
    key = f"{EVENT}{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"  # distinct per writer: no insert race, nothing lost
    client.set_registered_model_tag(name, key, json.dumps(event | {"at": _now()}))
    return key


def set_champion(client, name: str, version: str, who: str, why: str) -> str:
    """Record a promotion of ``version`` and settle ``champion`` on the history's top; returns the champion
    (``version`` unless a concurrent promotion landed after it)."""
    before = current(client, name, CHAMPION)
    _append(client, name, {"op": "promote", "version": str(version), "by": who, "why": why[:500]})
    for k, v in {"champion.by": who, "champion.why": why, "champion.at": _now()}.items():
        client.set_model_version_tag(name, version, k, v)
    now = _settle(client, name, CHAMPION, _top)
    previous = str(before.version) if before is not None else None
    if now == str(version) != previous:  # not a retry of a move already made, nor one a later promotion overtook
        announce(champion_moved(name, now, previous, who, why))
    return now


def _version(client, name: str, version: str):
    import mlflow

    try:
        return client.get_model_version(name, str(version))
    except mlflow.exceptions.MlflowException:
        raise RegistryError(f"{name} version {version}: not in the registry (see `qlora registry list {name}`)") from None


def promote(client, name: str, version: str, why: str, who: str | None = None) -> str:
    """Manual promotion: champion -> ``version``, recording who and why. Returns the champion, which is
    another version only if a concurrent promotion was recorded after this one."""
    mv = _version(client, name, version)
    return set_champion(client, name, str(mv.version), who or getpass.getuser(), f"manual: {why}")


def rollback(client, name: str, why: str = "rollback", who: str | None = None) -> tuple[str, str]:
    """Champion back to the previous champion; returns (from, to)."""
    _model(client, name)
    hist = history(client, name)
    cur = current(client, name, CHAMPION)
    if cur is None or len(hist) < 2:
        raise RegistryError(f"{name}: no previous champion to roll back to (champion history {hist})")
    frm, to = hist[-1], hist[-2]
    who = who or getpass.getuser()
    key = _append(client, name, {"op": "rollback", "from": frm, "to": to, "by": who, "why": why[:500]})
    now = _settle(client, name, CHAMPION, _top)
    if key not in _replay(client.get_registered_model(name).tags)[1]:  # v{frm} was no longer the champion by then
        raise RegistryError(f"{name}: champion moved to v{now} while rolling back from v{frm}; nothing was rolled back. "
                            f"Check `qlora registry list {name}` and roll back again if still wanted")
    client.set_model_version_tag(name, frm, "rolled_back", f"{_now()} by {who}: {why}")
    for k, v in {"champion.by": who, "champion.why": f"rollback from v{frm}: {why}", "champion.at": _now()}.items():
        client.set_model_version_tag(name, to, k, v)
    announce(champion_moved(name, to, frm, who, f"rollback from v{frm}: {why}"))
    return frm, to


def _model(client, name: str):
    import mlflow

    from qlora.errors import is_transient

    try:
        return client.get_registered_model(name)
    except mlflow.exceptions.MlflowException as e:
        if is_transient(e):  # a server that does not answer is not a missing model: the caller says "try again"
            raise
        raise RegistryError(f"{name}: no such registered model (check registry.model_name / the tracking URI)") from None


def list_lines(client, name: str) -> list[str]:
    """One line per version, newest first: version, aliases, key metrics, decision."""
    model = _model(client, name)
    by_version: dict[str, list[str]] = {}
    for alias, v in (model.aliases or {}).items():
        by_version.setdefault(str(v), []).append(alias)
    lines = []
    for mv in sorted(client.search_model_versions(f"name = {filter_literal(name)}"), key=lambda m: -int(m.version)):
        t = mv.tags
        try:  # the metric the gate compared for this version (exact match before gate metrics were named)
            metric = json.loads(t.get("promotion.evidence", "{}")).get("metric", "exact_match")
        except ValueError:
            metric = "exact_match"
        lines.append(
            f"v{mv.version:<3} {','.join(sorted(by_version.get(str(mv.version), []))) or '-':<21} "
            f"{metric} base {t.get(f'eval/base/{metric}', '?')} tuned {t.get(f'eval/tuned/{metric}', '?')}  "
            f"loss {t.get('eval/tuned/loss', '?')}  run {mv.run_id[:8]}  {t.get('promotion', '')}"
        )
    return lines
