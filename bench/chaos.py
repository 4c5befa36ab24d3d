"""`make chaos` (CHAOS_SEED, CHAOS_RUNS, CHAOS_FAULTS): the team setup under a seeded fault schedule, then checks.

    make chaos CHAOS_SEED=1 CHAOS_RUNS=24 CHAOS_FAULTS=36   # ~14 min on 2 idle cores; writes bench/results-chaos.json

What runs: PostgreSQL behind a real ``mlflow server``, a Prefect server (own PREFECT_HOME), the ``manual``
deployment of prefect.yaml and a process worker (``make worker``'s command), all on loopback. CHAOS_RUNS flow
runs of tiny-Llama configs (different seeds, ranks, gates), registering into two model names, so that runs of
one name register at once. A fault schedule drawn from CHAOS_SEED (targets, signals, delays, restart times;
*when* each fires depends on timing): SIGKILL or SIGTERM of a flow-run process while a given stage runs
(tokenize, quantize, train, evaluate, register: promotion happens inside register), of the worker, of the
MLflow server and of the Prefect server. What an operator or a scheduler does is done here too: a dead
server or worker is started again (same port, same data), a failed or crashed flow run is run again, and a
flow run left RUNNING/PENDING with no process behind it is marked CRASHED (as in the UI) and run again.

Then the checks (``check``), each a list of violations: every config ends with a registered version and each
FINISHED MLflow run has exactly one; no MLflow run RUNNING, no flow run RUNNING/PENDING; ``champion`` on a
version whose gate passed, the champion history without gaps; no ``.tmp`` folder, no held lock, no Prefect
concurrency slot still taken, no process of ours left; every version loads and generates through
``models:/NAME/VERSION``. The short seeded run is tests/system/test_chaos.py.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STAGES = ("tokenize", "quantize", "train", "evaluate", "register")
SERVICES = ("worker", "mlflow", "prefect")
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
NAMES = ("chaos-a", "chaos-b")  # two model names: half the runs register into each, side by side
# tokenize and quantize last about a second on the tiny configs: their faults are drawn with a tenth of the delay,
# or they would rarely find the stage still running (10 of 36 never fired at the full delay)
BRIEF = {"tokenize": 0.1, "quantize": 0.1}
MARK = "QLORA_CHAOS"  # in every process we start (inherited by flow runs): finds leftovers
PREFECT_HOME_DIR = "prefect-home"  # under the run's root: the Prefect server's data


# ---------------------------------------------------------------- the fault schedule


@dataclass
class Fault:
    target: str  # a stage (the flow-run process while it runs) or a service
    sig: str  # SIGKILL or SIGTERM
    delay: float  # s after the stage is seen running; for a service, s before it is started again
    fired_at: float | None = None  # s since the start
    note: str = ""


def schedule(seed: int, n: int) -> list[Fault]:
    """``n`` faults from ``seed``: about 2 of 3 on flow-run processes (each stage alike), the rest on services."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        target = rng.choice(STAGES) if rng.random() < 0.65 else rng.choice(SERVICES)
        delay = rng.uniform(0.0, 1.5) * BRIEF.get(target, 1.0) if target in STAGES else rng.uniform(1.0, 5.0)
        out.append(Fault(target, rng.choice(("SIGKILL", "SIGTERM")), round(delay, 2)))
    return out


def configs(tiny_base: Path, rows: Path, root: Path, n: int) -> list[dict]:
    """``n`` flow-run configs as the UI's form sends them: a few steps each; one in two gates with
    min_improvement=-1 (always promotes), the others with the default (promotes only a real improvement)."""
    out = []
    for i in range(n):
        out.append({
            "workdir": str(root / f"work-{i}"),  # own caches: each config's first try tokenizes and quantizes for real
            "model": {"name_or_path": str(tiny_base)},
            "data": {"path": str(rows), "max_length": 64, "eval_fraction": 0.02},
            "lora": {"r": 4 if i % 3 else 8, "alpha": 8},
            "train": {"max_steps": 6, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "seed": i,
                      "logging_steps": 1, "save_steps": 2},
            "eval": {"max_samples": 3, "max_new_tokens": 4},
            "registry": {"model_name": NAMES[i % 2], "bootstrap_resamples": 200, "consumer_check_prompts": 1,
                         "min_improvement": -1.0 if i % 4 < 2 else 0.0},
            "tracking": {"experiment_name": "chaos"},
        })
    return out


# ---------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def marked_pids(token: str) -> dict[int, str]:
    """pid -> flow run id ('' when none) of every live process whose environment holds ``MARK=token``."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes().split(b"\0")
            if f"{MARK}={token}".encode() not in env:
                continue
            if (d / "stat").read_text().split(") ")[1].startswith("Z"):  # a zombie: dead, not yet reaped
                continue
        except OSError:
            continue
        run = next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"PREFECT__FLOW_RUN_ID=")), "")
        found[int(d.name)] = run
    return found


class Service:
    """A server or worker in its own process group, restartable with the same command (same port and data)."""

    def __init__(self, name: str, cmd: list[str], env: dict, logs: Path, health: str | None = None):
        self.name, self.cmd, self.env, self.logs, self.health = name, cmd, env, logs, health
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, limit_s: float = 600) -> None:
        self.starts += 1
        log = (self.logs / f"{self.name}-{self.starts}.log").open("w")
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if self.health is None:
            return
        end = time.monotonic() + limit_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}: {log.name}")
            try:
                if httpx.get(self.health, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} not healthy after {limit_s:.0f} s")

    def signal(self, sig: int, group: bool) -> None:
        """``group``: the whole process group (systemd's default KillMode), else the main process only."""
        try:
            os.killpg(self.proc.pid, sig) if group else self.proc.send_signal(sig)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:  # a SIGTERM not heeded: the operator's next step
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGTERM, group=True)
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # what the main process left in its group
            except ProcessLookupError:
                pass


@dataclass
class Team:
    root: Path
    token: str
    pg_url: str
    services: dict[str, Service] = field(default_factory=dict)

    def __post_init__(self):
        self.logs = self.root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.mlflow_url = f"http://127.0.0.1:{free_port()}"
        self.api = f"http://127.0.0.1:{free_port()}/api"
        base = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PYTHONPATH", "PREFECT_API_URL")}
        base |= {MARK: self.token, "PREFECT_HOME": str(self.root / PREFECT_HOME_DIR), "PREFECT_API_URL": self.api,
                 "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
                 "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "TOKENIZERS_PARALLELISM": "false",
                 "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                 "QLORA_LOCK_DIR": str(self.root / "locks"), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.env = base
        port = self.mlflow_url.rsplit(":", 1)[1]
        self.services["mlflow"] = Service(
            "mlflow", [str(BIN / "mlflow"), "server", "--backend-store-uri", self.pg_url, "--artifacts-destination",
                       str(self.root / "mlartifacts"), "--host", "127.0.0.1", "--port", port, "--workers", "2"],
            base | {"PYTHONPATH": str(REPO)}, self.logs, self.mlflow_url + "/health")
        from qlora.locks import SERVER_LEASE_STORAGE

        self.services["prefect"] = Service(  # as `make server` starts it
            "prefect", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                        self.api.rsplit(":", 1)[1].split("/")[0]],
            base | {"PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": SERVER_LEASE_STORAGE}, self.logs, self.api + "/health")
        # `make worker`'s command; at most 2 flow runs at once on this worker (2 cores)
        self.services["worker"] = Service(
            "worker", [str(BIN / "prefect"), "worker", "start", "--pool", "qlora-process", "--type", "process",
                       "--limit", "2"], base | {"PREFECT_WORKER_QUERY_SECONDS": "1"}, self.logs)
        self.http = httpx.Client(base_url=self.api, timeout=60)  # a loaded server answers slowly, not never

    def start(self) -> None:
        self.services["mlflow"].start()
        self.services["prefect"].start()
        deploy_env = self.env | {"MLFLOW_TRACKING_URI": self.mlflow_url, "QLORA_REPO_DIR": str(REPO)}
        for cmd in ([str(BIN / "prefect"), "work-pool", "create", "qlora-process", "--type", "process"],
                    [str(BIN / "prefect"), "--no-prompt", "deploy", "--name", "manual"]):
            done = subprocess.run(cmd, cwd=REPO, env=deploy_env, capture_output=True, text=True, timeout=600)
            if done.returncode:
                raise RuntimeError(f"{cmd[1:3]}: {done.stdout[-2000:]}{done.stderr[-2000:]}")
        self.deployment = self.http.get("/deployments/name/qlora-finetune/manual").json()["id"]
        self.services["worker"].start()

    def stop(self) -> None:
        for name in ("worker", "prefect", "mlflow"):
            self.services[name].stop()
        self.http.close()

    def api_call(self, method: str, path: str, **kw):
        """The Prefect API, or None while it is down or busy (the caller asks again next tick)."""
        try:
            r = self.http.request(method, path, **kw)
        except httpx.HTTPError:
            return None
        return r.json() if r.status_code < 300 else None


# ---------------------------------------------------------------- the run: scheduler, operator, faults


class Chaos:
    def __init__(self, team: Team, cfgs: list[dict], faults: list[Fault], limit_s: float):
        self.team, self.cfgs, self.faults = team, cfgs, faults
        self.limit_s = limit_s
        self.attempts: dict[int, list[str]] = {i: [] for i in range(len(cfgs))}
        self.done: set[int] = set()
        self.operator_crashed: list[str] = []
        self.t0 = time.monotonic()
        self.next_fault_at = time.monotonic()
        # flow runs already signalled: one fault per flow run. After a SIGKILL the API still shows its stage
        # RUNNING and the worker starts a process with the run's environment to run its on_crashed hooks (~4 s);
        # a second "train" fault used to land there (6 of 36 on 12-06), mislabelled and killing the hooks.
        self.hit: set[str] = set()

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 1)

    def submit(self, i: int) -> None:
        body = {"parameters": {"config": self.cfgs[i]}, "tags": ["chaos", f"config-{i}"]}
        got = self.team.api_call("POST", f"/deployments/{self.team.deployment}/create_flow_run", json=body)
        if got is not None:
            self.attempts[i].append(got["id"])

    def runs(self) -> dict[str, dict] | None:
        ids = [r for a in self.attempts.values() for r in a]
        got = self.team.api_call("POST", "/flow_runs/filter", json={"flow_runs": {"id": {"any_": ids}}, "limit": 200})
        return None if got is None else {r["id"]: r for r in got}

    def loop(self) -> None:
        for i in range(len(self.cfgs)):
            self.submit(i)
        orphaned_since: dict[str, float] = {}
        while time.monotonic() - self.t0 < self.limit_s:
            runs = self.runs()
            if runs is None:
                time.sleep(1)
                continue
            live = marked_pids(self.team.token)
            by_run = {r: p for p, r in live.items() if r}
            for i, ids in self.attempts.items():
                if i in self.done:
                    continue
                if not ids:  # its first submission did not get through (the server down or busy): again
                    self.submit(i)
                    continue
                state = runs.get(ids[-1], {}).get("state", {}).get("type")
                if state == "COMPLETED":
                    self.done.add(i)
                elif state in FINAL:
                    self.submit(i)  # the scheduler's retry: the same config again
                elif state in ("RUNNING", "PENDING") and ids[-1] not in by_run:
                    # no process behind it (its worker died before starting it, or its last state was lost):
                    # after a grace, the operator marks it crashed
                    since = orphaned_since.setdefault(ids[-1], time.monotonic())
                    if time.monotonic() - since > 45:
                        self.team.api_call("POST", f"/flow_runs/{ids[-1]}/set_state", json={
                            "state": {"type": "CRASHED", "message": "marked crashed by the chaos operator: no process"},
                            "force": True})
                        self.operator_crashed.append(ids[-1])
                else:
                    orphaned_since.pop(ids[-1], None)
            if len(self.done) == len(self.cfgs):
                return
            self.maybe_fault(by_run)
            time.sleep(0.3)
        raise TimeoutError(f"configs {sorted(set(self.attempts) - self.done)} not completed in {self.limit_s:.0f} s")

    def maybe_fault(self, by_run: dict[str, int]) -> None:
        """Fire the first scheduled fault whose target can be hit now (its stage running in some flow run; a
        service, any time a flow run works): a fault waiting for a stage no run is in (tokenize and quantize come
        once per config) lets the later ones go first. Those that never find their moment are counted as such."""
        pending = [f for f in self.faults if f.fired_at is None]
        if not pending or time.monotonic() < self.next_fault_at or not by_run:
            return
        fresh = {r: p for r, p in by_run.items() if r not in self.hit}
        stages = self.stages_running(fresh) if fresh and any(f.target in STAGES for f in pending) else {}
        fault = next((f for f in pending if f.target not in STAGES or f.target in stages), None)
        if fault is None:
            return
        if fault.target in STAGES:
            run, pid = stages[fault.target]
            time.sleep(fault.delay)
            if self.stages_running({run: pid}).get(fault.target) is None:
                return  # the stage ended meanwhile: wait for another chance
            what = _cmdline(pid)
            try:
                os.kill(pid, getattr(signal, fault.sig))
            except ProcessLookupError:
                return
            self.hit.add(run)
            fault.note = f"flow run {run}, pid {pid}: {what[:80]}"
        else:
            svc = self.team.services[fault.target]
            # The worker alone (its flow runs live on, as under a process supervisor that restarts only it);
            # a server with its forked workers (systemd's control-group kill).
            svc.signal(getattr(signal, fault.sig), group=fault.target != "worker")
            time.sleep(fault.delay)  # the operator (or systemd's RestartSec) takes this long
            svc.start()
            fault.note = f"restarted after {fault.delay:.1f} s"
        fault.fired_at = self.now()
        self.next_fault_at = time.monotonic() + 3  # a fault at a time: each one's recovery is seen
        print(f"[{fault.fired_at:6.1f} s] {fault.sig} {fault.target}: {fault.note}", flush=True)

    def stages_running(self, by_run: dict[str, int]) -> dict[str, tuple[str, int]]:
        """stage -> (flow run, its pid) for the stages some live flow run is in now (one API call)."""
        got = self.team.api_call("POST", "/task_runs/filter", json={
            "flow_runs": {"id": {"any_": list(by_run)}}, "task_runs": {"state": {"type": {"any_": ["RUNNING"]}}}})
        out = {}
        for t in got or []:
            stage = t["name"].rsplit("-", 1)[0]
            if stage in STAGES and t["flow_run_id"] in by_run:
                out.setdefault(stage, (t["flow_run_id"], by_run[t["flow_run_id"]]))
        return out


# ---------------------------------------------------------------- the checks


def check(team: Team, cfgs: list[dict], attempts: dict[int, list[str]], generate: bool = True) -> dict[str, list[str]]:
    import mlflow

    from qlora.config.schema import PipelineConfig
    from registry import aliases

    v: dict[str, list[str]] = {k: [] for k in ("registered", "left_running", "champion", "leftovers", "generation")}
    client = mlflow.MlflowClient(team.mlflow_url)
    exp = client.get_experiment_by_name("chaos")
    runs = client.search_runs([exp.experiment_id], max_results=1000) if exp else []
    versions = [mv for n in NAMES for mv in _versions(client, n)]
    per_run: dict[str, list] = {}
    for mv in versions:
        per_run.setdefault(mv.run_id, []).append(mv)
    for r in runs:
        if r.info.status == "FINISHED" and len(per_run.get(r.info.run_id, [])) != 1:
            v["registered"].append(f"FINISHED run {r.info.run_id} has {len(per_run.get(r.info.run_id, []))} versions")
        if r.info.status == "RUNNING":
            v["left_running"].append(f"MLflow run {r.info.run_id} RUNNING")
    for i, cfg in enumerate(cfgs):
        key = PipelineConfig.model_validate(cfg).fingerprint()
        ok = [r for r in runs if r.data.tags.get("config_hash") == key and r.info.status == "FINISHED"
              and per_run.get(r.info.run_id)]
        if not ok:
            v["registered"].append(f"config {i} ({cfg['registry']['model_name']}) has no FINISHED run with a version")
    ids = [r for a in attempts.values() for r in a]
    got = team.http.post("/flow_runs/filter", json={"flow_runs": {"id": {"any_": ids}}, "limit": 200}).json()
    v["left_running"] += [f"flow run {r['id']} {r['state']['type']}" for r in got
                          if r["state"]["type"] in ("RUNNING", "PENDING")]

    for name in NAMES:
        mvs = {mv.version: mv for mv in _versions(client, name)}
        passed = {k for k, mv in mvs.items() if mv.tags.get("promotion") == "promoted to champion"}
        champ = aliases.current(client, name, aliases.CHAMPION)
        hist = aliases.history(client, name) if mvs else []
        if champ is not None and str(champ.version) not in passed:
            v["champion"].append(f"{name}: champion v{champ.version} did not pass the gate ({champ.tags.get('promotion')})")
        if champ is None and passed:
            v["champion"].append(f"{name}: versions {sorted(passed)} passed the gate, no champion")
        if champ is not None and (not hist or hist[-1] != str(champ.version)):
            v["champion"].append(f"{name}: champion v{champ.version}, history ends {hist[-1:]}")
        if gaps := sorted(passed - set(hist), key=int):
            v["champion"].append(f"{name}: promoted versions {gaps} missing from the champion history {hist}")
        if strays := [h for h in hist if h not in passed]:
            v["champion"].append(f"{name}: history {hist} holds versions {strays} that did not pass the gate")
        if generate:
            v["generation"] += _generation_problems(name, mvs, team.mlflow_url)

    v["leftovers"] += leftovers(team, cfgs)
    return v


def _versions(client, name: str) -> list:
    try:
        return client.search_model_versions(f"name = '{name}'")
    except Exception:  # noqa: BLE001 - no version yet: the name does not exist
        return []


def _generation_problems(name: str, mvs: dict, url: str) -> list[str]:
    from registry.consumer import predict

    out = []
    for version in sorted(mvs, key=int):
        try:
            got = predict(f"models:/{name}/{version}", ["reverse: a b c"], max_new_tokens=4, tracking_uri=url)
            if len(got) != 1 or not isinstance(got[0], str):
                out.append(f"models:/{name}/{version} returned {got!r}")
        except Exception as e:  # noqa: BLE001 - each failure is a finding
            out.append(f"models:/{name}/{version}: {type(e).__name__}: {str(e)[:300]}")
    return out


def leftovers(team: Team, cfgs: list[dict]) -> list[str]:
    """Processes of flow runs that are over, ``.tmp`` folders, locks some process holds, taken Prefect slots."""
    from filelock import FileLock, Timeout

    for _ in range(30):  # every flow run is over (the loop saw to it): a process of one is exiting or orphaned
        strays = {p: r for p, r in marked_pids(team.token).items() if r}
        if not strays:
            break
        time.sleep(1)
    out = [f"process {p} of flow run {r} still alive: {_cmdline(p)}" for p, r in strays.items()]
    for root in [Path(c["workdir"]) for c in cfgs] + [team.root / "locks", team.root / "mlartifacts"]:
        for p in root.rglob("*.tmp") if root.exists() else []:
            out.append(f"staging folder left: {p}")
        for p in root.rglob("*.lock") if root.exists() else []:
            lock = FileLock(str(p), thread_local=False)
            try:
                lock.acquire(timeout=0)
                lock.release()
            except Timeout:
                out.append(f"lock still held: {p}")
    for _ in range(20):  # a killed holder's lease (qlora.locks.LEASE_S) runs out within ~75 s
        limits = team.http.post("/v2/concurrency_limits/filter", json={}).json()
        taken = [f"Prefect concurrency limit {c['name']}: {c['active_slots']} slot(s) taken" for c in limits if c["active_slots"]]
        if not taken:
            break
        time.sleep(5)
    return out + taken


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    except OSError:
        return "?"


# ---------------------------------------------------------------- the whole thing


def run(root: Path, seed: int, n_runs: int, n_faults: int, limit_s: float = 1800, generate: bool = True) -> dict:
    """Start everything, run the schedule, check, stop everything; the results as a dict."""
    from demo.build import build_demo_base, write_demo_data
    from tests.postgres import Postgres, ensure_installed

    t0 = time.monotonic()
    root.mkdir(parents=True, exist_ok=True)
    base = build_demo_base(root / "base", REPO / "data" / "demo" / "reverse_words.jsonl", hidden_size=64, num_layers=2,
                           num_heads=2, vocab_size=512, max_positions=256)
    rows = write_demo_data(root / "rows.jsonl", n=400)
    if ensure_installed() is None:
        raise RuntimeError("PostgreSQL (initdb) not found")
    pg = Postgres(free_port())
    token = f"{seed}-{os.getpid()}"
    team = Team(root, token, pg.start())
    faults, cfgs = schedule(seed, n_faults), configs(base, rows, root, n_runs)
    chaos = None
    try:
        team.start()
        setup_s = round(time.monotonic() - t0, 1)
        chaos = Chaos(team, cfgs, faults, limit_s)
        error = ""
        try:
            chaos.loop()
        except TimeoutError as e:
            error = str(e)
        loop_s = chaos.now()
        t_check = time.monotonic()
        violations = check(team, cfgs, chaos.attempts, generate)
        check_s = round(time.monotonic() - t_check, 1)
        if error:
            violations["registered"].append(error)
    finally:
        team.stop()
        pg.stop()
    strays = marked_pids(token)
    if strays:
        violations["leftovers"] += [f"process {p} alive after every service stopped: {_cmdline(p)}" for p in strays]
    fired = [f for f in faults if f.fired_at is not None]
    skipped = [f for f in faults if f.fired_at is None]
    for f in skipped:
        f.note = f"never fired: no flow run was in {f.target} when its turn came" if f.target in STAGES else "never fired"
    counts: dict[str, int] = {}
    for f in fired:
        counts[f"{f.sig} {f.target}"] = counts.get(f"{f.sig} {f.target}", 0) + 1
    return {
        "seed": seed, "runs": n_runs, "faults_planned": n_faults, "faults_fired": len(fired), "faults_skipped": len(skipped),
        "fault_counts": dict(sorted(counts.items())), "faults": [asdict(f) for f in faults],
        "flow_run_attempts": sum(len(a) for a in chaos.attempts.values()),
        "marked_crashed_by_operator": len(chaos.operator_crashed),
        "violations": {k: len(x) for k, x in violations.items()}, "violation_details": violations,
        "total_violations": sum(len(x) for x in violations.values()),
        "wall_s": round(time.monotonic() - t0, 1), "setup_s": setup_s, "chaos_s": loop_s, "check_s": check_s,
        "machine": f"{os.cpu_count()} cores", "logs": str(team.logs),
    }


CHECKS = {
    "registered": "every config ends with a registered version; one version per FINISHED MLflow run",
    "left_running": "no MLflow run RUNNING, no Prefect flow run RUNNING or PENDING",
    "champion": "champion on a version whose gate passed; champion history without gaps",
    "leftovers": "no `.tmp` folder, held lock, taken Prefect slot or process of a finished run",
    "generation": "every version loads and generates through `models:/NAME/VERSION`",
}


def table(res: dict) -> str:
    """The Markdown table docs/benchmarks.md#chaos shows."""
    faults = ", ".join(f"{k} {n}" for k, n in res["fault_counts"].items())
    lines = [f"seed {res['seed']}, {res['runs']} configs, {res['faults_fired']} of {res['faults_planned']} faults fired "
             f"({res['faults_skipped']} never fired: no flow run reached their stage before every config had finished), {res['flow_run_attempts']} flow runs, "
             f"{res['wall_s']:.0f} s wall ({res['chaos_s']:.0f} s of faults), {res['machine']}: {faults}", "",
             "| check | violations |", "|---|---|"]
    lines += [f"| {text} | {res['violations'][k]} |" for k, text in CHECKS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=int(os.environ.get("CHAOS_SEED", 1)))
    p.add_argument("--runs", type=int, default=int(os.environ.get("CHAOS_RUNS", 24)))
    p.add_argument("--faults", type=int, default=int(os.environ.get("CHAOS_FAULTS", 36)))
    p.add_argument("--limit-s", type=float, default=1800, help="the fault phase ends here, done or not; then the checks")
    p.add_argument("--dir", type=Path, default=REPO / ".qlora" / "chaos")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results-chaos.json")
    p.add_argument("--table", action="store_true", help="print the Markdown table of --out and stop")
    args = p.parse_args(argv)
    if args.table:
        print(table(json.loads(args.out.read_text())))
        return 0
    import shutil

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` or CI stopping us: servers and PostgreSQL stop too
    shutil.rmtree(args.dir, ignore_errors=True)
    res = run(args.dir, args.seed, args.runs, args.faults, args.limit_s)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(table(res))
    return 1 if res["total_violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
