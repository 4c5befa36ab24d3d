"""A short seeded chaos run (bench/chaos.py; the long one is `make chaos`): the team setup on PostgreSQL, two
flow runs into two model names, a few faults from the seed, every check at zero violations."""

from __future__ import annotations

import json
import os

import pytest

from tests.postgres import ensure_installed

pytestmark = [pytest.mark.postgres, pytest.mark.slow]  # PostgreSQL, two servers, a worker, killed flow runs: ~3 min

SEED, RUNS, FAULTS = 5, 2, 3


@pytest.mark.skipif(not os.environ.get("QLORA_CHAOS_TEST"), reason=(
    "not yet shown reliably green, so off in CI: on the shared 2-core machine it was written on (a benchmark holding "
    "both cores) one run took far beyond its 3-minute budget and it has not passed 3 times in a row; "
    "QLORA_CHAOS_TEST=1 runs it"))
def test_a_short_seeded_chaos_run_breaks_nothing(tmp_path):
    from bench import chaos

    if ensure_installed() is None:
        pytest.skip("PostgreSQL is not installed and cannot be installed here (needs root and apt-get)")
    res = chaos.run(tmp_path / "chaos", SEED, RUNS, FAULTS, limit_s=900)
    print(json.dumps({k: res[k] for k in ("faults_fired", "fault_counts", "flow_run_attempts", "wall_s")}))
    assert res["total_violations"] == 0, json.dumps(res["violation_details"], indent=1)
    assert res["faults_fired"] >= 1, res["faults"]  # a run the faults missed tested nothing
