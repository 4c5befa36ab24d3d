"""Runs sharing one CPU worker (issue 13, item 10): each run sizes its compute threads from the cores it may
use and the worker's training slots, and trainings beyond the slots wait instead of oversubscribing."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import uuid

import prefect.main  # noqa: F401  Prefect configures logging on import: bind its console handler now, not to a test's capture
import pytest

from qlora.config.schema import LoraSection, TrainConfig
from tests.conftest import REPO

LORA = LoraSection(r=4, alpha=8, dropout=0.0)


def test_threads_follow_the_cores_available_and_the_slots():
    """In a fresh process (torch's thread pool is per process): no OMP_NUM_THREADS, all cores, then 2 slots,
    then an affinity of one core; an OMP_NUM_THREADS the user set wins."""
    code = (
        "import json, os\n"
        "import torch\n"
        "from qlora.locks import available_cpus, set_threads\n"
        "def fresh():\n"
        "    os.environ.pop('OMP_NUM_THREADS', None); os.environ.pop('MKL_NUM_THREADS', None)\n"
        "out = {'cpus': available_cpus(), 'one_slot': set_threads(1), 'torch': torch.get_num_threads()}\n"
        "out['omp_env'] = os.environ['OMP_NUM_THREADS']\n"
        "fresh(); out['two_slots'] = set_threads(2)\n"
        "fresh(); os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})\n"
        "out['one_core'] = [available_cpus(), set_threads(1), torch.get_num_threads()]\n"
        "fresh(); os.environ['OMP_NUM_THREADS'] = '3'; out['user_set'] = set_threads(1)\n"
        "print(json.dumps(out))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(REPO)
    out = json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                                    timeout=120).stdout.splitlines()[-1])
    cpus = out["cpus"]
    assert 1 <= cpus <= len(os.sched_getaffinity(0))
    assert out["one_slot"] == out["torch"] == cpus and out["omp_env"] == str(cpus)  # children (torchrun ranks) inherit it
    assert out["two_slots"] == max(1, cpus // 2)
    assert out["one_core"] == [1, 1, 1]
    assert out["user_set"] == 3


def test_a_machine_slot_waits_for_its_holder_and_survives_a_sigkill(tmp_path):
    """Slot files are flocks: a second run waits while the first holds the worker's only slot, and gets it
    the moment the holder dies, even by SIGKILL (a Prefect lease would stay taken until it expires)."""
    import signal

    from qlora.locks import machine_slot

    code = (f"import time\nfrom pathlib import Path\nfrom qlora.locks import machine_slot\n"
            f"with machine_slot(1, Path({str(tmp_path)!r})):\n    print('held', flush=True)\n    time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert holder.stdout.readline().strip() == "held"
        got = threading.Event()

        def second():
            with machine_slot(1, tmp_path, poll_s=0.05):
                got.set()

        t = threading.Thread(target=second, daemon=True)
        t.start()
        assert not got.wait(1.5)  # queued behind the holder
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert got.wait(10)  # the OS released the dead holder's slot
    t.join(10)


@pytest.mark.slow  # two trainings queued one after the other: ~19 s
def test_two_trainings_on_one_worker_queue_on_the_prefect_limit(prefect_server, prepared, caplog):
    """Two train tasks at once with train.slots_per_worker=1: the limit is created with 1 slot, one training
    waits for the other, and while one trains the Prefect API shows the slot taken."""
    from prefect.client.orchestration import get_client

    from flows import stages

    work, _, data, base = prepared
    name = f"qlora-train-test-{uuid.uuid4().hex[:8]}"
    configs = [TrainConfig(max_steps=4, per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=1e-3,
                           save_steps=100, seed=seed, concurrency_limit=name) for seed in (1, 2)]
    results, errors, seen = {}, [], []
    done = threading.Event()

    def watch():
        with get_client(sync_client=True) as c:
            while not done.is_set():
                try:
                    seen.append(c.read_global_concurrency_limit_by_name(name).active_slots)
                except Exception:  # not created yet
                    pass
                done.wait(0.2)

    def run(cfg):
        try:
            results[cfg.seed] = stages.train(base, data, LORA, cfg, str(work))
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    with caplog.at_level(logging.INFO):
        threads = [threading.Thread(target=run, args=(cfg,)) for cfg in configs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
    done.set()
    watcher.join(10)
    assert not errors, errors
    assert {r.global_step for r in results.values()} == {4}
    # Held by one training at a time. The Prefect slot is taken before the machine slot, so had the limit let
    # both in, the second would have held it while waiting for the machine slot: the API would show 2.
    assert max(seen) == 1
    waits = [float(r.getMessage().rsplit("waited ", 1)[1].split()[0]) for r in caplog.records
             if r.getMessage().startswith(f"Prefect concurrency limit {name}: slot acquired")]
    assert len(waits) == 2 and max(waits) > 1.0  # the second waited for the first
    acquired = [r.created for r in caplog.records if "training slot 1 of 1 on this worker acquired" in r.getMessage()]
    released = [r.created for r in caplog.records if "training slot 1 of 1 on this worker released" in r.getMessage()]
    assert len(acquired) == len(released) == 2
    assert released[0] <= acquired[1]  # one after the other, never both at once
    with get_client(sync_client=True) as c:
        limit = c.read_global_concurrency_limit_by_name(name)
    assert limit.limit == 1 and limit.active_slots == 0


def test_openmp_wait_policy_is_the_users_choice():
    """PASSIVE halved one training's speed on an idle 2-core machine (200 demo steps: 40.9 s vs 21.4 s), so the
    project no longer sets it: importing it leaves OMP_WAIT_POLICY as the user has it (unset, or their value)."""
    code = "import os, flows.cli, torch; print(os.environ.get('OMP_WAIT_POLICY', 'unset'))"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | {"PYTHONPATH": str(REPO)}
    run = lambda e: subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, check=True).stdout.strip()  # noqa: E731
    assert run(env) == "unset"
    assert run(env | {"OMP_WAIT_POLICY": "PASSIVE"}) == "PASSIVE"  # a shared machine may want sleeping threads
