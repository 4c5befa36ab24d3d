"""One huge row must not exhaust memory (issue 13, item 1): texts are cut to a character bound derived from
``data.max_length`` before tokenizing, the row is named by file:line, and truncation keeps the same tokens."""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
import time

import pytest

from qlora.config.schema import DataConfig, ModelConfig
from qlora.errors import DataError
from qlora.models import load_tokenizer
from tasks.data.encode import encode
from tasks.data.pipeline import prepare_data
from tests.conftest import REPO

WORDS = ["apple", "river", "stone", "tiger", "lemon", "castle", "lamp", "cloud", "forest", "mirror"]


@pytest.fixture(scope="module")
def tok(tiny_base):
    return load_tokenizer(ModelConfig(name_or_path=str(tiny_base)))


def _file_with_a_huge_row(path, chars: int, line: int = 6):
    """Good alpaca rows, and at ``line`` one whose answer is ``chars`` characters of words."""
    rng = random.Random(0)
    big = " ".join(rng.choice(WORDS) for _ in range(chars // 5))[:chars]
    rows = [json.dumps({"instruction": f"say {i}", "output": str(i)}) for i in range(40)]
    rows.insert(line - 1, json.dumps({"instruction": "Reverse the order of these words: a b c", "output": big}))
    path.write_text("\n".join(rows) + "\n")
    return path


def test_a_long_row_is_cut_before_tokenizing_with_the_same_tokens_kept(tok, tmp_path, caplog):
    p = _file_with_a_huge_row(tmp_path / "long.jsonl", chars=300_000)
    with caplog.at_level(logging.WARNING, logger="qlora.tokenize"):
        prep = prepare_data(DataConfig(path=str(p), max_length=64, eval_fraction=0.1, seed=1), tok)
    assert f"{p}:6: 300,000 characters in one text" in caplog.text and "characters in one text" in caplog.text
    assert prep.report.truncated_rows == 1
    rows = [r for r in prep.train.to_list() + prep.eval.to_list() if len(r["input_ids"]) == 64]
    assert len(rows) == 1
    # Exactly the tokens that tokenizing the whole row and truncating gives.
    full = json.loads(p.read_text().splitlines()[5])
    from qlora.template import render_turns

    whole = encode(tok, [render_turns([("user", full["instruction"]), ("assistant", full["output"])], tok)], 64)
    assert rows[0]["input_ids"] == whole["input_ids"][0] and rows[0]["labels"] == whole["labels"][0]


def test_a_long_row_dropped_or_refused_names_its_line(tok, tmp_path):
    p = _file_with_a_huge_row(tmp_path / "long.jsonl", chars=300_000)
    prep = prepare_data(DataConfig(path=str(p), max_length=64, overlength="drop", max_drop_fraction=0.1), tok)
    assert prep.report.problem_lines == [f"{p}:6: 300,000 characters, more than data.max_length=64 tokens (data.overlength=drop)"]
    with pytest.raises(DataError, match=rf"{p}:6: 300,000 characters, more than data.max_length=64 tokens"):
        prepare_data(DataConfig(path=str(p), max_length=64, overlength="error"), tok)


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:")), 0.0)
    except OSError:
        return 0.0


def test_validate_data_on_a_50_mb_row_stays_far_under_2_gb(tiny_base, tmp_path):
    """Peak RSS of `qlora validate-data` itself (wait4's rusage of that one process). A watchdog kills it
    above 2.5 GB, so a regression fails here in seconds instead of swapping the machine."""
    p = _file_with_a_huge_row(tmp_path / "huge.jsonl", chars=50_000_000)
    cmd = [sys.executable, "-m", "flows.cli", "validate-data", str(REPO / "configs" / "demo.yaml"),
           "--set", f"data.path={p}", "--set", f"model.name_or_path={tiny_base}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed, deadline = False, time.monotonic() + 300
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if _rss_mb(proc.pid) > 2500 or time.monotonic() > deadline:
            proc.kill()
            killed = True
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode()
    peak_mb = usage.ru_maxrss / 1024
    print(f"validate-data on a 50 MB row: peak RSS {peak_mb:.0f} MB")
    assert not killed, f"killed at {peak_mb:.0f} MB"
    assert proc.returncode == 0, err[-2000:]
    assert peak_mb < 2000
    assert f"{p}:6: 50,000,000 characters in one text" in err  # the row is named
