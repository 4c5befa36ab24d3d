"""Shared fixtures: a tiny real Llama built on the fly, an isolated MLflow store, a Prefect test server."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Nothing may reach a model hub during tests; every model here is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "qlora")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")  # plain stage calls in tests
# `mlflow server` otherwise starts five huey job consumers (GenAI jobs we never use) that eat the CPU.
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.pop("MLFLOW_TRACKING_URI", None)
# `make test` runs pytest-xdist workers (-n 3, -n 2 for the slow tier): each worker's torch gets its share of the cores, not all of them
# (two processes of all-core OpenMP threads on 2 cores slow each other tens of times: qlora/locks.py, set_threads).
# An OMP_NUM_THREADS already set wins, as in the pipeline.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))
# Machine-wide device and training slots (qlora/locks.py) in a folder of this session (of this xdist worker): a
# worker's trainings never wait for the other worker's, nor for a real run on this machine, and a test never
# finds a slot another session left. Set before anything imports qlora.locks (it reads it once).
if "QLORA_LOCK_DIR" not in os.environ:
    os.environ["QLORA_LOCK_DIR"] = tempfile.mkdtemp(prefix="qlora-test-locks-")
    atexit.register(shutil.rmtree, os.environ["QLORA_LOCK_DIR"], ignore_errors=True)

# Prefect configures logging when it is first imported and replaces the root logger's handlers, pytest's log
# capture among them: imported first inside a test (a file run alone), that test's caplog then saw nothing
# (test_fault_injection's divergence warning). Configure it now, after the settings above, before any capture.
import prefect.main  # noqa: E402,F401

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "data" / "demo" / "reverse_words.jsonl"
SHARED_DATA = REPO / "data" / "public"  # verbatim copies of ../shared/data, see its SOURCES.md


def built_once(tmp_path_factory, name: str, build) -> Path:
    """``build(folder)`` once per test run: under pytest-xdist the first worker builds it in the run's shared
    temporary root while the others wait on a file lock, then all read the same folder (read-only after)."""
    from filelock import FileLock

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        out = tmp_path_factory.mktemp(name)
        build(out)
        return out
    out = tmp_path_factory.getbasetemp().parent / name  # the root all workers' basetemps sit in
    done = out.with_name(name + ".built")
    with FileLock(str(out) + ".lock"):
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)  # a build cut short by a crashed worker
            out.mkdir()
            build(out)
            done.touch()
    return out


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A 2-layer, 64-wide Llama with a BPE tokenizer trained on the demo corpus (random weights)."""
    from demo.build import build_demo_base

    # 2048 positions: the shared data's longest rows fit, as they would in a real base's context.
    return built_once(tmp_path_factory, "tiny-base", lambda out: build_demo_base(
        out, DEMO_DATA, hidden_size=64, num_layers=2, num_heads=2, vocab_size=512, max_positions=2048))


@pytest.fixture(scope="session")
def prepared_once(tiny_base, tmp_path_factory) -> Path:
    """The demo data tokenized and the tiny base quantized, once per session (6,000 rows): a workdir whose
    ``tokenized/`` and ``quantized/`` caches every module's ``prepared`` starts from."""
    from qlora.config.schema import QuantizationConfig
    from tasks.quantize import prepare_quantized_model
    from tasks.tokenize import tokenize_dataset

    def build(work: Path) -> None:
        model, data = _demo_sections(tiny_base)
        tokenize_dataset(data, model, work)
        prepare_quantized_model(model, QuantizationConfig(), work)

    return built_once(tmp_path_factory, "prepared-once", build)


def _demo_sections(tiny_base: Path):
    from qlora.config.schema import DataConfig, ModelConfig

    return ModelConfig(name_or_path=str(tiny_base)), DataConfig(path=str(DEMO_DATA), max_length=64, eval_fraction=0.02)


@pytest.fixture(scope="module")
def prepared(tiny_base, prepared_once, tmp_path_factory):
    """(workdir, model config, tokenized demo data, 4-bit base) for stage-level tests. One workdir per module,
    so modules that corrupt or lock run directories do not see each other's; its caches are copies of the
    session's, so the stages below are cache hits (what a re-run sees) instead of work repeated per module."""
    import shutil

    from qlora.config.schema import QuantizationConfig
    from tasks.quantize import prepare_quantized_model
    from tasks.tokenize import tokenize_dataset

    work = tmp_path_factory.mktemp("work")
    for cache in ("tokenized", "quantized"):
        shutil.copytree(prepared_once / cache, work / cache, ignore=shutil.ignore_patterns(".lock*"))
    model, data_cfg = _demo_sections(tiny_base)
    data = tokenize_dataset(data_cfg, model, work)
    base = prepare_quantized_model(model, QuantizationConfig(), work)
    assert data.path.startswith(str(work.resolve())) and base.path.startswith(str(work.resolve()))  # hits, found where they are now
    return work, model, data, base


def _migrated_prefect_db(out: Path) -> None:
    """A Prefect server database with every migration applied (what a temporary server's start spent ~10 s on here)."""
    import asyncio

    import prefect.settings
    from prefect.server.database import provide_database_interface
    from prefect.server.database.dependencies import temporary_database_interface

    url = f"sqlite+aiosqlite:///{out / 'prefect.db'}"
    with temporary_database_interface(), prefect.settings.temporary_settings(
            updates={prefect.settings.PREFECT_SERVER_DATABASE_CONNECTION_URL: url}):
        async def create() -> None:
            db = provide_database_interface()
            await db.create_db()
            await (await db.engine()).dispose()

        asyncio.run(create())


@pytest.fixture(scope="session")
def prefect_db(tmp_path_factory) -> Path:
    """The migrated Prefect database every test server starts from (built once per test run, read-only)."""
    return built_once(tmp_path_factory, "prefect-db", _migrated_prefect_db) / "prefect.db"


@pytest.fixture(scope="session")
def prefect_home(prefect_db):
    """``prefect_home(folder)`` makes ``folder`` a PREFECT_HOME whose server database is a copy of the migrated one
    and returns it as a string, for the environment of a ``prefect server start``, a worker or a ``qlora run`` (its
    temporary server). Started on an empty home, a Prefect server here took 11.4 s of CPU, 7 of them migrating;
    from the copy, 4.5 s. A test of a first start on an empty home (test_flow_e2e's temporary-server test) keeps
    an empty one."""

    def make(folder: Path) -> str:
        folder.mkdir(parents=True, exist_ok=True)
        assert not (folder / "prefect.db").exists(), f"{folder} already holds a Prefect database"
        shutil.copyfile(prefect_db, folder / "prefect.db")
        return str(folder)

    return make


@pytest.fixture(scope="session")
def prefect_server(prefect_db):
    """A throwaway Prefect API (temporary SQLite) for the whole session; flows run against it. One per xdist
    worker, not one for all: the train stage's Prefect concurrency limit (``train.concurrency_limit``, per host)
    would otherwise make the workers' trainings wait for each other. Its database starts as a copy of one
    migrated once per test run (``prefect_test_harness`` names it ``prefect-test.db`` in a folder it makes; were
    that ever renamed, the server would migrate its own database, only slower)."""
    import prefect.testing.utilities as harness

    make_folder = harness.mkdtemp

    def folder_with_database(*args, **kwargs) -> str:
        folder = make_folder(*args, **kwargs)
        shutil.copyfile(prefect_db, Path(folder) / "prefect-test.db")
        return folder

    harness.mkdtemp = folder_with_database
    try:
        # 300 s: two xdist workers start theirs at once, and on a loaded 2-core machine one start took over 120 s.
        with harness.prefect_test_harness(server_startup_timeout=300):
            yield
    finally:
        harness.mkdtemp = make_folder


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory):
    """``mlflow_store(db)`` makes ``db`` a fresh, empty sqlite tracking store and returns its URI. MLflow builds a
    new store by running its 68 schema migrations (1.4-4.5 s here, in every test and every ``qlora`` subprocess
    that opens one); this copies one migrated once per test run instead. The copy is what MLflow would have made:
    only its Default experiment's artifact location (``./mlruns/0``, resolved when the store was made) is moved
    next to ``db``."""
    import sqlite3

    def build(out: Path) -> None:
        from mlflow.tracking import MlflowClient

        MlflowClient(f"sqlite:///{out / 'mlflow.db'}").search_experiments()

    template = built_once(tmp_path_factory, "mlflow-store", build) / "mlflow.db"

    def make(db: Path) -> str:
        assert not db.exists(), f"{db} exists: a fresh store is made only where there is none"
        db.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, db)
        with sqlite3.connect(db) as con:
            con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                        (str(db.parent.resolve() / "mlruns" / "0"),))
        con.close()
        return f"sqlite:///{db}"

    return make


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch, mlflow_store) -> str:
    """A fresh sqlite tracking store and artifact root under tmp_path."""
    monkeypatch.chdir(tmp_path)
    uri = mlflow_store(tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def qlora(capfd, *argv: str) -> tuple[int, str, str]:
    """``qlora ARGV`` run in this process by ``flows.cli.main``, the function the command runs: (exit code, stdout,
    stderr). A fresh interpreter per call would spend ~8 s importing what this one already has; the command's own
    entry point is tested in a subprocess once (tests/unit/flows/test_cli.py). Output is read at the file
    descriptors, so a traceback a logging handler writes counts too."""
    from flows.cli import main

    capfd.readouterr()  # only this command's output
    code = main(list(argv))
    out, err = capfd.readouterr()
    return code, out, err


def task_runs(flow_run_id, until=lambda runs: True, wait_s: float = 30) -> list:
    """The flow run's Prefect task runs. Their states reach the API through events, a little after the flow run
    ends: read again every 0.5 s until ``until(runs)`` holds or ``wait_s`` has passed (then the last read)."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + wait_s
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            if until(runs) or time.monotonic() > deadline:
                return runs
            time.sleep(0.5)


def pytest_collection_finish(session):
    """Everything collection imported (torch, transformers, MLflow, Prefect: millions of objects) moves to the
    garbage collector's permanent generation. A full collection walks every tracked object, and the Trainer's
    ``free_memory`` and the model cache's release run one per training and per registration: ~0.7 s each here
    with those objects in the heap. What the tests create afterwards is collected as before."""
    import gc

    gc.collect()
    gc.freeze()


def pytest_collection_modifyitems(config, items):
    """Tiers by folder: everything under tests/system is slow (servers, workers, kills: `make test-slow`);
    unit/ and scenarios/ tests are slow only where marked (`make test` leaves those out)."""
    system = REPO / "tests" / "system"
    for item in items:
        if system in Path(item.fspath).parents:
            item.add_marker(pytest.mark.slow)
