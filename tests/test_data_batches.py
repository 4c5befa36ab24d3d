"""Efficient batches (length grouping reaches the Trainer) and the data report as a Prefect artifact."""

from pathlib import Path

import pytest

from bench.data import padding_efficiency
from qlora.config import DataConfig, ModelConfig, TrainConfig
from qlora.loading import load_tokenizer
from tasks.data.encode import prepare
from tasks.training.recipe import training_arguments

from .conftest import DEMO_DATA, SHARED_DATA


def test_length_grouping_reaches_095_padding_efficiency_on_code_alpaca(tiny_base):
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_base)))
    prep = prepare(DataConfig(path=str(SHARED_DATA / "code_alpaca_2k.json"), max_length=1024), tok)
    lengths = [len(x) for x in prep.train["input_ids"]]
    for bs in (4, 8):  # the default per-device batch and configs/gpu-example.yaml's
        random_eff = padding_efficiency(lengths, bs, grouped=False)
        grouped_eff = padding_efficiency(lengths, bs, grouped=True)
        assert random_eff < 0.8 and grouped_eff >= 0.95, (bs, random_eff, grouped_eff)


@pytest.mark.parametrize("group, strategy", [(True, "group_by_length"), (False, "random")])
def test_train_config_sets_the_trainer_sampler(tmp_path, group, strategy):
    import torch

    args = training_arguments(TrainConfig(group_by_length=group), tmp_path, torch.float32, checkpointing=False)
    assert args.train_sampling_strategy == strategy


def test_tokenize_task_publishes_the_data_report_artifact(tmp_path, tiny_base, prefect_server):
    from prefect import flow, runtime
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    from flows import stages

    @flow
    def just_tokenize(work: str):
        ref = stages.tokenize(DataConfig(path=str(DEMO_DATA), max_length=64), ModelConfig(name_or_path=str(tiny_base)), work)
        return ref, runtime.flow_run.id

    ref, run_id = just_tokenize(str(tmp_path / "work"))
    with get_client(sync_client=True) as client:  # this flow run's report, not an earlier test's
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["data-report"]),
                                                                    flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    assert arts and arts[0].type == "markdown"
    assert arts[0].data == Path(ref.report_path).read_text()
    assert "6000 rows read, 0 dropped, 5400 train / 600 eval" in arts[0].data


def test_packed_examples_do_not_attend_to_each_other(tiny_base):
    """Loss on one packed row == token-weighted loss of the examples run one by one (sdpa, tiny Llama)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.training.recipe import collator

    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_base)))
    prep = prepare(DataConfig(path=str(SHARED_DATA / "sharegpt_dummy_conversation.json"), max_length=160), tok)
    feats = [{k: prep.train[i][k] for k in ("input_ids", "labels")} for i in range(6)]
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base), attn_implementation="sdpa", dtype=torch.float32).eval()
    # As in training (tasks/train.py): with a KV cache, transformers skips packed-sequence detection.
    model.config.use_cache = False
    batch = collator(tok, packing=True)(feats)
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    with torch.no_grad():
        packed = float(model(**batch).loss)
        total = count = 0.0
        for f in feats:
            labels = torch.tensor([[-100] + f["labels"][1:]])  # the collator masks each example's first token
            n = int((labels[:, 1:] != -100).sum())
            total += float(model(input_ids=torch.tensor([f["input_ids"]]), labels=labels).loss) * n
            count += n
        # the same row with a plain all-ones mask: every example sees the ones before it
        leaky = float(model(**batch, attention_mask=torch.ones_like(batch["input_ids"])).loss)
    assert packed == pytest.approx(total / count, rel=1e-4)
    assert abs(leaky - packed) > 1e-3
    assert len({len(f["input_ids"]) for f in feats}) > 1  # uneven examples, as real batches are
