"""State on disk is checked before it is trusted: each cache and record the flow reads back, cut short or
garbled as a crash, a full disk or an interrupted download leaves it, is rebuilt with one warning naming
its path (never used as it is, never a traceback), and a base whose weights file is cut short gets one
clear error naming the file."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from qlora.config.schema import DataConfig, LoraSection, ModelConfig, QuantizationConfig, TrackingConfig, TrainConfig
from qlora.errors import ModelError
from tasks.quantize import prepare_quantized_model
from tasks.tokenize import tokenize_dataset
from tasks.train import train_adapter
from tests.conftest import DEMO_DATA


def _cut(f: Path, keep: float = 0.5) -> None:
    f.write_bytes(f.read_bytes()[: int(f.stat().st_size * keep)])


@pytest.fixture
def work(prepared, tmp_path) -> Path:
    """A copy of the module's prepared workdir (its caches), so cutting files here breaks nothing else."""
    src = prepared[0]
    dst = tmp_path / "work"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock*", "runs", "mlflow-runs"))
    return dst


def _data(tiny_base):
    return DataConfig(path=str(DEMO_DATA), max_length=64, eval_fraction=0.02), ModelConfig(name_or_path=str(tiny_base))


def test_a_tokenized_cache_cut_short_is_rebuilt_with_one_warning(work, tiny_base, caplog):
    from datasets import load_from_disk

    data, model = _data(tiny_base)
    (arrow,) = [f for f in work.glob("tokenized/*/train/*.arrow")]
    _cut(arrow)
    with caplog.at_level(logging.WARNING, logger="qlora.storage"):
        ref = tokenize_dataset(data, model, work)
    said = [r.getMessage() for r in caplog.records if r.name == "qlora.storage"]
    assert len(said) == 1 and f"the tokenized dataset at {arrow.parents[1]} is broken" in said[0] and "bytes" in said[0]
    assert len(load_from_disk(ref.path)["train"]) == ref.train_rows  # rebuilt whole


def test_a_quantized_base_cut_short_is_rebuilt(work, prepared, tiny_base, caplog):
    from transformers import AutoModelForCausalLM

    # The entry this process's config keys to: the workdir may hold two, where two test workers timed
    # compute_dtype auto differently (seen once on a Xeon with AMX: one float32, one bfloat16)
    weights = work / "quantized" / Path(prepared[3].path).name / "model.safetensors"
    _cut(weights, 0.9)
    with caplog.at_level(logging.WARNING, logger="qlora.storage"):
        ref = prepare_quantized_model(ModelConfig(name_or_path=str(tiny_base)), QuantizationConfig(), work)
    assert f"the pre-quantized base at {weights.parent} is broken (model.safetensors is" in caplog.text
    AutoModelForCausalLM.from_pretrained(ref.path, device_map="cpu")  # loads: the rebuilt one is whole


def test_a_moved_workdir_is_found_where_it_is_now(work, tiny_base, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.move(work, moved)
    data, model = _data(tiny_base)
    ref = tokenize_dataset(data, model, moved)
    base = prepare_quantized_model(model, QuantizationConfig(), moved)
    assert ref.path.startswith(str(moved.resolve())) and ref.report_path.startswith(str(moved.resolve()))
    assert base.path.startswith(str(moved.resolve()))  # not the folder it was written in, which is gone


def test_an_adapter_cut_short_is_written_again_from_its_last_checkpoint(prepared, tmp_path, caplog):
    """The last checkpoint (at max_steps) is the trained state: the adapter is written again from it, bit for bit,
    with no step trained. transformers 5, resumed there, ran one more optimizer step (global step 3 of 2; at a
    constant learning rate, other weights); a checkpoint saved as training ended is now taken as it is."""
    import torch
    from safetensors.torch import load_file

    _, _, data, base = prepared
    train = TrainConfig(max_steps=2, save_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                        learning_rate=3e-3, optim="adamw_torch", lr_scheduler_type="constant")
    work = tmp_path / "w"
    first = train_adapter(base, data, LoraSection(r=4, alpha=8), train, work)
    weights = Path(first.path) / "adapter_model.safetensors"
    good = {k: v.clone() for k, v in load_file(weights).items()}  # load_file maps the file: copy before the cut
    _cut(weights)
    with caplog.at_level(logging.INFO):
        again = train_adapter(base, data, LoraSection(r=4, alpha=8), train, work)
    assert f"the trained adapter at {weights.parent} is broken (adapter_model.safetensors is" in caplog.text
    assert "checkpoint-2 was saved as training ended; taking it as it is" in caplog.text
    assert again.resumed_from_step == 2 and again.global_step == 2
    assert sorted(p.name for p in Path(again.run_dir).glob("checkpoint-*")) == ["checkpoint-2"]
    redone = load_file(Path(again.path) / "adapter_model.safetensors")
    assert redone.keys() == good.keys() and all(torch.equal(redone[k], good[k]) for k in good)


def test_a_checkpoint_saved_as_early_stopping_ended_training_is_the_end(tmp_path):
    """Early stopping saves its last checkpoint with the TrainerControl that stopped training: resuming there would
    train past where the uninterrupted run stopped."""
    import json

    from tasks.training.checkpoints import training_ended_at

    def ckpt(step: int, max_steps: int, stop: bool) -> Path:
        d = tmp_path / f"checkpoint-{step}-{max_steps}-{stop}"
        d.mkdir()
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": max_steps, "stateful_callbacks": {
            "TrainerControl": {"args": {"should_training_stop": stop}, "attributes": {}}}}))
        return d

    assert training_ended_at(ckpt(700, 900, True)) and training_ended_at(ckpt(900, 900, False))
    assert not training_ended_at(ckpt(700, 900, False))


def test_a_garbled_run_record_starts_a_new_run_with_one_warning(tmp_path, mlflow_uri, caplog):
    from qlora.tracking.runs import release_run_record, start_or_resume_run

    work = tmp_path / "w"
    cfg = TrackingConfig(uri=mlflow_uri)
    first = start_or_resume_run(cfg, work, "key", "r")
    release_run_record(work, "key")
    record = work / "mlflow-runs" / "key.json"
    record.write_text(record.read_text()[:20])  # cut short mid-write
    with caplog.at_level(logging.WARNING, logger="qlora.tracking"):
        second = start_or_resume_run(cfg, work, "key", "r")
    release_run_record(work, "key")
    assert f"run record {record} is broken" in caplog.text
    assert second.run_id != first.run_id and record.read_text() == second.model_dump_json()


def test_a_base_whose_weights_are_cut_short_is_one_clear_error(tiny_base, tmp_path):
    from qlora.models import check_reference

    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    _cut(base / "model.safetensors", 0.6)
    with pytest.raises(ModelError, match=r"model\.name_or_path: .*model\.safetensors is cut short: [\d,]+ of [\d,]+ bytes: "
                                         r"an interrupted download or copy\? Download or copy that file again"):
        check_reference(ModelConfig(name_or_path=str(base)))
    with pytest.raises(ModelError, match="is cut short"):
        prepare_quantized_model(ModelConfig(name_or_path=str(base)), QuantizationConfig(), tmp_path / "w")
