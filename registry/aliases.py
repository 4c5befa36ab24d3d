"""Alias moves that people and the gate make, each recorded in tags so the registry explains itself.

The champion's history is a JSON list of versions in the registered model's ``champion_history``
tag: the gate and ``qlora promote`` append, ``qlora rollback`` pops. MLflow keeps no alias history
itself, so without this "the previous champion" would be unknowable.
"""

from __future__ import annotations

import getpass
import json
import time

from qlora.errors import UserError

CHAMPION, CHALLENGER = "champion", "challenger"
HISTORY = "champion_history"


class RegistryError(UserError):
    """A registry command asked for something the registry does not hold (unknown model, version, alias)."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def history(client, name: str) -> list[str]:
    return json.loads(client.get_registered_model(name).tags.get(HISTORY, "[]"))


def current(client, name: str, alias: str):
    """The version behind ``alias``, or None."""
    import mlflow

    try:
        return client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        return None


def set_challenger(client, name: str, version: str) -> None:
    """``challenger`` -> ``version`` unless a newer version exists already (concurrent registrations:
    the newest version's own writer sets it, so the alias does not go backwards when writers race)."""
    newest = max(int(m.version) for m in client.search_model_versions(f"name='{name}'"))
    if int(version) >= newest:
        client.set_registered_model_alias(name, CHALLENGER, version)


def _lost_insert_race(e: Exception) -> bool:
    """MLflow's SQL registry store writes a new tag as select-then-insert: two writers creating the same
    tag at once make one fail on the primary key (seen on PostgreSQL in the concurrent-registration test)."""
    text = str(e)
    return any(s in text for s in ("UniqueViolation", "UNIQUE constraint failed", "duplicate key value"))


def set_champion(client, name: str, version: str, who: str, why: str) -> None:
    import mlflow

    client.set_registered_model_alias(name, CHAMPION, version)
    for attempt in range(3):
        hist = history(client, name)  # re-read: a writer that lost the race appends to the winner's list
        if hist and hist[-1] == str(version):
            break
        try:
            client.set_registered_model_tag(name, HISTORY, json.dumps(hist + [str(version)]))
            break
        except mlflow.exceptions.MlflowException as e:
            if attempt == 2 or not _lost_insert_race(e):
                raise
    for k, v in {"champion.by": who, "champion.why": why, "champion.at": _now()}.items():
        client.set_model_version_tag(name, version, k, v)


def _version(client, name: str, version: str):
    import mlflow

    try:
        return client.get_model_version(name, str(version))
    except mlflow.exceptions.MlflowException:
        raise RegistryError(f"{name} version {version}: not in the registry (see `qlora registry list {name}`)") from None


def promote(client, name: str, version: str, why: str, who: str | None = None) -> str:
    """Manual promotion: champion -> ``version``, recording who and why."""
    mv = _version(client, name, version)
    set_champion(client, name, str(mv.version), who or getpass.getuser(), f"manual: {why}")
    return str(mv.version)


def rollback(client, name: str, why: str = "rollback", who: str | None = None) -> tuple[str, str]:
    """Champion back to the previous champion; returns (from, to)."""
    _model(client, name)
    hist = history(client, name)
    cur = current(client, name, CHAMPION)
    if cur is None or len(hist) < 2:
        raise RegistryError(f"{name}: no previous champion to roll back to (champion history {hist})")
    frm, to = hist[-1], hist[-2]
    client.set_registered_model_alias(name, CHAMPION, to)
    client.set_registered_model_tag(name, HISTORY, json.dumps(hist[:-1]))
    who = who or getpass.getuser()
    client.set_model_version_tag(name, frm, "rolled_back", f"{_now()} by {who}: {why}")
    for k, v in {"champion.by": who, "champion.why": f"rollback from v{frm}: {why}", "champion.at": _now()}.items():
        client.set_model_version_tag(name, to, k, v)
    return frm, to


def _model(client, name: str):
    import mlflow

    try:
        return client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        raise RegistryError(f"{name}: no such registered model (check registry.model_name / the tracking URI)") from None


def list_lines(client, name: str) -> list[str]:
    """One line per version, newest first: version, aliases, key metrics, decision."""
    model = _model(client, name)
    by_version: dict[str, list[str]] = {}
    for alias, v in (model.aliases or {}).items():
        by_version.setdefault(str(v), []).append(alias)
    lines = []
    for mv in sorted(client.search_model_versions(f"name='{name}'"), key=lambda m: -int(m.version)):
        t = mv.tags
        lines.append(
            f"v{mv.version:<3} {','.join(sorted(by_version.get(str(mv.version), []))) or '-':<21} "
            f"em base {t.get('eval/base/exact_match', '?')} tuned {t.get('eval/tuned/exact_match', '?')}  "
            f"loss {t.get('eval/tuned/loss', '?')}  run {mv.run_id[:8]}  {t.get('promotion', '')}"
        )
    return lines
