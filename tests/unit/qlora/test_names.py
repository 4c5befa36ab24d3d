"""registry.model_name: refused at config load when MLflow would refuse it at registration (after training),
and quoted safely wherever it goes into an MLflow search filter (issue 13, item 7)."""

from __future__ import annotations

import mlflow
import pytest
import yaml

from qlora.config.files import load_config
from qlora.errors import ConfigError

REFUSED = ["team/model", "model:v2", "..", ".", "..hidden", "", "  ", " padded", "both'and\"", "x" * 250]
ACCEPTED = ["qlora-demo", "it's-tuned", 'say "hi"', "back\\slash", "a%b_c", "Ünïcode model", "x" * 249]


def _config_naming(tmp_path, name):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"registry": {"model_name": name}}))  # exact round trip, quotes and spaces included
    return load_config(f)


@pytest.mark.parametrize("name", REFUSED)
def test_names_mlflow_refuses_fail_at_config_load_naming_the_key(tmp_path, name):
    with pytest.raises(ConfigError) as e:
        _config_naming(tmp_path, name)
    assert "registry.model_name" in str(e.value)


def test_our_rules_agree_with_mlflows_own_check(tmp_path):
    from mlflow.utils.validation import _validate_model_name

    from qlora.tracking.names import model_name_problem

    for name in REFUSED + ACCEPTED:
        try:
            _validate_model_name(name)
            mlflow_ok = True
        except mlflow.exceptions.MlflowException:
            mlflow_ok = False
        # We refuse a superset: MLflow's rules, plus what no search filter can quote and what cannot get "-merged".
        if not mlflow_ok:
            assert model_name_problem(name) is not None, name
    for name in ACCEPTED:
        assert model_name_problem(name) is None, name
        assert _config_naming(tmp_path, name).registry.model_name == name


def test_names_with_quotes_work_in_every_registry_filter(mlflow_uri, tmp_path):
    """A real sqlite store: idempotent registration, challenger, list and rollback all search by name."""
    from registry import aliases
    from registry.register import version_of_run

    client = mlflow.MlflowClient(mlflow_uri)
    exp = client.create_experiment("names", artifact_location=(tmp_path / "art").as_uri())
    for name in ("it's-tuned", 'say "hi"'):
        client.create_registered_model(name)
        runs = [client.create_run(exp).info.run_id for _ in range(2)]
        for run_id in runs:
            client.create_model_version(name, source=str(tmp_path), run_id=run_id)
        assert str(version_of_run(client, name, runs[0]).version) == "1"
        assert str(version_of_run(client, name, runs[1]).version) == "2"
        aliases.set_challenger(client, name, "2")
        assert str(client.get_model_version_by_alias(name, "challenger").version) == "2"
        aliases.promote(client, name, "1", why="first")
        aliases.promote(client, name, "2", why="second")
        assert aliases.rollback(client, name, why="undo") == ("2", "1")
        lines = aliases.list_lines(client, name)
        assert [line.split()[0] for line in lines] == ["v2", "v1"]


def test_filter_literal_picks_the_quote_the_value_lacks():
    from qlora.tracking.names import filter_literal

    assert filter_literal("abc") == "'abc'"
    assert filter_literal("it's") == '"it\'s"'
    with pytest.raises(ValueError):
        filter_literal("both'\"")
