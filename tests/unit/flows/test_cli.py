"""The ``qlora`` command's conventions: ``--version``, ``--help`` listing the exit codes, and one meaning per exit
code (argparse's 2 only for a bad command line; a tracking server that does not answer is 75, try again;
``qlora reproduce`` tells "differs" (3) from "refused" (4))."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest

from flows import cli
from flows.cli import EXIT_CODES, EXIT_DIFFERS, EXIT_OK, EXIT_REFUSED, EXIT_TRY_AGAIN, EXIT_USAGE, main
from tests.conftest import REPO, qlora


def _qlora(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), **env}, timeout=120)


def test_version_and_help_say_what_the_exit_codes_mean():
    from importlib.metadata import version

    out = _qlora("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"qlora {version('qlora-pipeline')}", out
    help_ = _qlora("--help").stdout
    assert "exit codes:" in help_ and all(f"  {code:<3} {what}" in help_ for code, what in EXIT_CODES.items())
    assert len(set(EXIT_CODES)) == len(EXIT_CODES) == 6


def test_a_bad_command_line_is_2_and_only_that(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run"])  # the config argument is missing
    assert e.value.code == EXIT_USAGE and "usage: qlora run" in capsys.readouterr().err
    assert EXIT_TRY_AGAIN != EXIT_USAGE


@pytest.mark.parametrize("command", [("predict", "models:/x/1", "hi"), ("registry", "list", "x")])
def test_a_tracking_server_that_does_not_answer_is_75(command, monkeypatch, capfd):
    """Also for `registry list`, which used to call an unreachable server's model "no such registered model" (exit 1)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    code, _, err = qlora(capfd, *command, "--tracking-uri", "http://127.0.0.1:9")
    assert code == EXIT_TRY_AGAIN, err[-2000:]
    assert "the tracking server did not answer" in err and "Traceback" not in err
    assert "no such registered model" not in err


def _reproduce_returning(monkeypatch, outcome):
    """The reproduce flow stood in for (its real runs are tests/system/test_sweep.py's, a training each): only the
    mapping from its outcome to the exit code is under test here."""
    def qlora_reproduce(**_):
        if isinstance(outcome, Exception):
            raise outcome
        return outcome
    monkeypatch.setattr(cli, "_flows", lambda module: types.SimpleNamespace(qlora_reproduce=qlora_reproduce))


@pytest.mark.parametrize("identical, code", [(True, EXIT_OK), (False, EXIT_DIFFERS)])
def test_reproduce_says_identical_or_differs_by_its_code(monkeypatch, capsys, identical, code):
    from registry.rebuild import Verdict

    word = "identical" if identical else "different"
    _reproduce_returning(monkeypatch, Verdict(identical=identical, registered_sha256="a", new_sha256="a" if identical else "b",
                                              line=f"{word}: demo v1 rebuilt"))
    assert main(["reproduce", "models:/demo/1"]) == code
    assert capsys.readouterr().out.startswith(word)


def test_reproduce_refused_is_its_own_code(monkeypatch, capsys):
    from registry.rebuild import NotReproducible

    _reproduce_returning(monkeypatch, NotReproducible("data d.jsonl: no longer matches v1's data.fingerprint"))
    assert main(["reproduce", "models:/demo/1"]) == EXIT_REFUSED
    assert capsys.readouterr().err.startswith("error: data d.jsonl")
