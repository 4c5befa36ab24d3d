"""Sweep planning without running anything: the grid syntax, which keys may be swept, each trial's validated
config, the ranking, and the CLI's one-line errors for bad input."""

from __future__ import annotations

import pytest

from flows.sweep_plan import (
    SweepConfig,
    TrialOutcome,
    best,
    grid_trials,
    key_problem,
    markdown,
    parse_grid,
    ranking_metric,
    sweep_config,
    table,
)
from qlora.config.files import load_config
from qlora.config.schema import PipelineConfig
from qlora.errors import ConfigError
from qlora.refs import Adapter, EvalReport, MlflowRun, QuantizedModel, TokenizedData, Trained
from tests.conftest import REPO, qlora


def test_grid_values_are_yaml_and_brackets_keep_their_commas():
    grid = parse_grid(["train.learning_rate=1e-4,2.0e-4", "lora.r=16,64",
                       "lora.target_modules=[q_proj,v_proj],all-linear"])
    assert grid == {"train.learning_rate": ["1e-4", 2e-4], "lora.r": [16, 64],
                    "lora.target_modules": [["q_proj", "v_proj"], "all-linear"]}
    trials = grid_trials(PipelineConfig(), SweepConfig(grid=grid))
    assert len(trials) == 8 and [t.index for t in trials] == list(range(8))
    # Values as the validated config holds them ("1e-4" is a float once the config has read it).
    assert trials[0].values == {"train.learning_rate": 1e-4, "lora.r": 16, "lora.target_modules": ["q_proj", "v_proj"]}
    assert trials[0].config.train.learning_rate == 1e-4 and trials[7].config.lora.target_modules == "all-linear"
    assert trials[7].config.lora.r == 64 and trials[7].config.train.learning_rate == 2e-4


@pytest.mark.parametrize("item, says", [
    ("train.learning_rate", "--grid train.learning_rate: expected dotted.key=value1,value2"),
    ("=1,2", "--grid =1,2: expected dotted.key=value1,value2"),
    ("lora.r=", "--grid lora.r=: expected dotted.key=value1,value2"),
    ("lora.r=[1,2", "--grid lora.r=[1,2: values are not valid YAML"),
])
def test_malformed_grid_items_name_themselves(item, says):
    with pytest.raises(ConfigError) as e:
        parse_grid([item])
    assert says in str(e.value)


def test_a_key_given_twice_is_refused():
    with pytest.raises(ConfigError, match="--grid lora.r: given twice"):
        parse_grid(["lora.r=8", "lora.r=16"])


@pytest.mark.parametrize("key, problem", [
    ("train.learnig_rate", "unknown key"),
    ("lora", "is a section; sweep its keys, e.g. lora.r"),
    ("registry.model_name", "cannot be swept"),
    ("eval.max_samples", "cannot be swept"),
    ("lora.r.x", "unknown key"),
    ("data.columns.instruction", "unknown key"),  # a dict field is swept whole: data.columns={...},{...}
])
def test_keys_that_cannot_be_swept(key, problem):
    assert problem in key_problem(key)
    with pytest.raises(ConfigError) as e:
        sweep_config(grid={key: [1, 2]})
    assert str(e.value).startswith(f"--grid {key}: ") and problem in str(e.value)


def test_sweepable_keys():
    for key in ("train.learning_rate", "lora.r", "data.sources", "data.columns", "quantization.quant_type"):
        assert key_problem(key) is None, key


def test_a_bad_value_names_the_trial_and_the_key():
    with pytest.raises(ConfigError) as e:
        grid_trials(PipelineConfig(), SweepConfig(grid={"lora.r": [8], "train.learning_rate": [1e-4, -1]}))
    assert "sweep trial 1 (lora.r=8, train.learning_rate=-1): train.learning_rate: Input should be greater than 0" in str(e.value)


def test_tpe_needs_a_trial_count_and_an_empty_grid_is_refused():
    with pytest.raises(ConfigError, match="sweep: sampler=tpe needs trials"):
        sweep_config(grid={"lora.r": [8, 16]}, sampler="tpe")
    with pytest.raises(ConfigError, match="grid is empty"):
        sweep_config(grid={})


def _outcome(i: int, em: float | None, loss: float = 1.0, rouge: float | None = None, samples=()) -> TrialOutcome:
    run = MlflowRun(tracking_uri="sqlite:///x.db", run_id=f"r{i}")
    trained = None
    if em is not None:
        data = TokenizedData(path="d", fingerprint="f", train_rows=1, eval_rows=1)
        trained = Trained(data=data, base=QuantizedModel(path="b", base="b", fingerprint="b", footprint_bytes=1),
                          adapter=Adapter(path="a", run_dir="r", global_step=3, train_loss=2.0),
                          report=EvalReport(metrics={"eval/tuned/exact_match": em, "eval/tuned/loss": loss,
                                                   **({"eval/tuned/rouge": rouge} if rouge is not None else {})},
                                          samples=list(samples)))
    return TrialOutcome(index=i, values={"lora.r": 8 * (i + 1)}, config=PipelineConfig(), run=run, trained=trained,
                        status="COMPLETED" if em is not None else "FAILED", duration_s=1.0)


def test_best_is_the_gate_metric_then_the_lower_eval_loss_and_failed_trials_are_rows_too():
    outs = [_outcome(0, 0.5, 2.0), _outcome(1, None), _outcome(2, 0.5, 1.5), _outcome(3, 0.25, 0.1)]
    metric = ranking_metric("exact_match", outs)
    assert metric == "eval/tuned/exact_match"
    assert best(outs, metric).index == 2  # tie on exact match, lower eval loss
    rows = table(outs, metric, best(outs, metric))
    assert [r["best"] for r in rows] == ["", "", "yes", ""] and rows[1]["status"] == "FAILED"
    assert len({tuple(r) for r in rows}) == 1  # same columns in every row (Prefect table artifacts need it)
    assert "| 2 | 24 | 0.5 | 1.5 |" in markdown(rows)
    assert best([_outcome(0, None)], metric) is None


def test_trials_are_ranked_by_the_metric_the_gate_would_use():
    """registry.gate_metric auto: open-ended references make the gate (and so the sweep) compare rouge, not exact match."""
    from flows.sweep import _ranking

    long = [{"prompt": "p", "reference": "a long open ended answer of many words", "base": "", "tuned": ""}]
    short = [{"prompt": "p", "reference": "c b a", "base": "", "tuned": ""}]
    outs = [_outcome(0, 0.0, 1.0, rouge=0.2, samples=long), _outcome(1, 0.0, 2.0, rouge=0.6, samples=long)]
    assert _ranking(PipelineConfig(), outs) == "eval/tuned/rouge"
    assert best(outs, _ranking(PipelineConfig(), outs)).index == 1  # the better rouge, though its eval loss is higher
    outs = [_outcome(0, 0.5, 1.0, rouge=0.9, samples=short), _outcome(1, 0.75, 2.0, rouge=0.1, samples=short)]
    assert _ranking(PipelineConfig(), outs) == "eval/tuned/exact_match"
    cfg = PipelineConfig.model_validate({"registry": {"gate_metric": "rouge"}})
    assert _ranking(cfg, outs) == "eval/tuned/rouge"


def _sweep(capfd, *args) -> tuple[int, str, str]:
    return qlora(capfd, "sweep", str(REPO / "configs" / "demo.yaml"), *args)


@pytest.mark.parametrize("args, says", [
    (["--grid", "train.learning_rate"], "error: --grid train.learning_rate: expected dotted.key=value1,value2"),
    (["--grid", "train.learnig_rate=1e-4,2e-4"], "error: --grid train.learnig_rate: unknown key"),
    (["--grid", "lora.r=8,-1"], "error: sweep trial 1 (lora.r=-1): lora.r: Input should be greater than 0"),
])
def test_cli_bad_sweep_input_is_one_line_exit_1(args, says, tmp_path, monkeypatch, capfd):
    from prefect.server.api.server import SubprocessASGIServer

    monkeypatch.chdir(tmp_path)
    servers = dict(SubprocessASGIServer._instances)
    code, _, err = _sweep(capfd, *args)
    assert code == 1, err[-2000:]
    assert says in err and "Traceback" not in err
    assert not (tmp_path / "mlflow.db").exists()  # refused before anything started
    assert SubprocessASGIServer._instances == servers  # no temporary Prefect server either


def test_tpe_without_optuna_says_which_extra(tmp_path, monkeypatch, capfd):
    try:
        import optuna  # noqa: F401
    except ImportError:
        monkeypatch.chdir(tmp_path)
        code, _, err = _sweep(capfd, "--grid", "lora.r=8,16", "--sampler", "tpe", "--trials", "2")
        assert code == 1 and "pip install 'qlora-pipeline[sweep]'" in err
        return
    pytest.skip("optuna is installed (the sweep extra); tests/system/test_sweep.py runs a TPE sweep")


def test_demo_config_loads_with_a_grid():
    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert [t.config.lora.r for t in grid_trials(cfg, SweepConfig(grid={"lora.r": [32, 64]}))] == [32, 64]


def test_tpe_asks_in_batches_within_the_grid_and_learns_from_told_scores():
    pytest.importorskip("optuna")
    from flows.sweep_plan import TpeSearch

    sweep = SweepConfig(grid={"lora.r": [4, 8, 16], "lora.target_modules": [["q_proj"], "all-linear"]}, sampler="tpe",
                        trials=5, max_parallel=2)
    search = TpeSearch(PipelineConfig(), sweep)
    seen = []
    while not search.done:
        batch = search.ask(sweep.max_parallel)
        assert 1 <= len(batch) <= 2
        for t in batch:
            assert t.config.lora.r in (4, 8, 16) and t.config.lora.target_modules in (["q_proj"], "all-linear")
            score = None if t.index == 1 else t.config.lora.r / 16  # trial 1 "failed"
            search.tell(_outcome(t.index, score), "eval/tuned/exact_match")
        seen += [t.index for t in batch]
    assert seen == [0, 1, 2, 3, 4]
    states = [t.state.name for t in search.study.trials]
    assert states.count("COMPLETE") == 4 and states.count("FAIL") == 1
    with pytest.raises(ConfigError, match="--grid lora.r=0: lora.r: Input should be greater than 0"):  # every value checked up front
        TpeSearch(PipelineConfig(), sweep.model_copy(update={"grid": {"lora.r": [8, 0]}}))
