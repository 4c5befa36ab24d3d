"""Efficient batches (length grouping reaches the Trainer) and the data report as a Prefect artifact."""

from pathlib import Path

import pytest

from bench.data import padding_efficiency
from qlora.config.schema import DataConfig, ModelConfig, TrainConfig
from qlora.models import load_tokenizer
from tasks.data.pipeline import prepare_data
from tasks.training.recipe import training_arguments
from tests.conftest import DEMO_DATA, SHARED_DATA


def test_length_grouping_reaches_095_padding_efficiency_on_code_alpaca(tiny_base):
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_base)))
    prep = prepare_data(DataConfig(path=str(SHARED_DATA / "code_alpaca_2k.json"), max_length=1024), tok)
    lengths = [len(x) for x in prep.train["input_ids"]]
    for bs in (4, 8):  # the default per-device batch and configs/gpu-example.yaml's
        random_eff = padding_efficiency(lengths, bs, grouped=False)
        grouped_eff = padding_efficiency(lengths, bs, grouped=True)
        assert random_eff < 0.8 and grouped_eff >= 0.95, (bs, random_eff, grouped_eff)


@pytest.mark.parametrize("group, strategy", [(True, "group_by_length"), (False, "random")])
def test_train_config_sets_the_trainer_sampler(tmp_path, group, strategy):
    import torch

    args = training_arguments(TrainConfig(group_by_length=group), tmp_path, torch.float32, checkpointing=False, optim="adamw_torch")
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


@pytest.mark.parametrize("packing", [True, "bfd"])
def test_packed_examples_do_not_attend_to_each_other(tiny_base, packing):
    """Loss on one packed row == token-weighted loss of the examples run one by one (sdpa, tiny Llama); for
    bfd the rows are first packed into bins of 320 tokens (several rows each), one bin per batch row."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from tasks.training.packing import pack_bfd
    from tasks.training.recipe import collator

    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_base)))
    prep = prepare_data(DataConfig(path=str(SHARED_DATA / "sharegpt_dummy_conversation.json"), max_length=160), tok)
    feats = [{k: prep.train[i][k] for k in ("input_ids", "labels")} for i in range(6)]
    if packing == "bfd":
        bins = pack_bfd(Dataset.from_list(feats), 320)
        assert len(bins) < len(feats) and max(len(b) for b in bins["seq_lengths"]) > 1  # rows share bins
        batch = collator(tok, packing)([bins[i] for i in range(len(bins))])
    else:
        batch = collator(tok, packing)(feats)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base), attn_implementation="sdpa", dtype=torch.float32).eval()
    # As in training (tasks/train.py): with a KV cache, transformers skips packed-sequence detection.
    model.config.use_cache = False
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == (len(bins) if packing == "bfd" else 1)
    width, real = batch["input_ids"].shape[1], sum(len(f["input_ids"]) for f in feats)
    tails = sum(width - sum(s) for s in bins["seq_lengths"]) if packing == "bfd" else 0  # bins' tails padded
    assert batch["input_ids"].numel() == real + tails
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
        packed = float(out.loss)
        total = count = 0.0
        for f in feats:
            labels = torch.tensor([[-100] + f["labels"][1:]])  # the collator masks each example's first token
            n = int((labels[:, 1:] != -100).sum())
            total += float(model(input_ids=torch.tensor([f["input_ids"]]), labels=labels).loss) * n
            count += n
        # the same row with a plain all-ones mask: every example sees the ones before it. Compared on the
        # last hidden states: on a random base with a tied head the loss barely moves (5e-5) though they do.
        leaky = model(**batch, attention_mask=torch.ones_like(batch["input_ids"]), output_hidden_states=True)
    assert packed == pytest.approx(total / count, rel=1e-4)
    assert float((leaky.hidden_states[-1] - out.hidden_states[-1]).abs().max()) > 1e-2
    assert len({len(f["input_ids"]) for f in feats}) > 1  # uneven examples, as real batches are


def test_bfd_packs_every_code_alpaca_row_once_into_full_bins(tiny_base):
    """Best-fit decreasing on real data: each row in exactly one bin, token for token; no bin over capacity;
    bins >= 0.99 full; never more bins than TRL's bfd; the same bins every time (ranks and resumes agree)."""
    import math

    from tasks.training.packing import bin_fill, pack_bfd

    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_base)))
    prep = prepare_data(DataConfig(path=str(SHARED_DATA / "code_alpaca_2k.json"), max_length=1024), tok)
    rows = prep.train.select_columns(["input_ids", "labels"])
    packed = pack_bfd(rows, 1024)
    lengths = [len(x) for x in rows["input_ids"]]
    bins_ids, bins_labels, seqs = packed["input_ids"], packed["labels"], packed["seq_lengths"]
    assert all(sum(s) == len(ids) <= 1024 for s, ids in zip(seqs, bins_ids))
    unpacked = []
    for ids, labels, s in zip(bins_ids, bins_labels, seqs):
        start = 0
        for n in s:
            unpacked.append((tuple(ids[start:start + n]), tuple(labels[start:start + n])))
            start += n
    assert sorted(unpacked) == sorted(zip(map(tuple, rows["input_ids"]), map(tuple, rows["labels"])))
    assert bin_fill(packed, 1024) >= 0.99 and len(packed) <= math.ceil(sum(lengths) / 1024) + 2
    assert pack_bfd(rows, 1024)["seq_lengths"] == seqs
    trl = pytest.importorskip("trl.data_utils")  # the bench extra; TRL is never a runtime dependency
    assert len(packed) <= len(trl.pack_dataset(rows, 1024, strategy="bfd"))


def test_bfd_refuses_a_row_longer_than_a_bin():
    from tasks.training.packing import bfd_bins

    assert bfd_bins([3, 5, 2, 4], 8) == [[1, 0], [3, 2]]
    with pytest.raises(ValueError, match=r"training row 1 has 9 tokens, more than the bin capacity 8 \(train.packing_tokens\)"):
        bfd_bins([3, 9], 8)


def test_training_with_bfd_packing_steps_through_the_bins(prepared, caplog):
    """One epoch of the real stage with packing: bfd: the Trainer's steps are the bins (not the rows) in micro-batches
    of 16 bins, each [16, <= 64] with every row's positions restarting, and the loss falls. Pad tokens (bins'
    tails) are at position 0 too: restarts = rows + pad tokens."""
    import logging
    import math

    from datasets import load_from_disk
    from transformers import TrainerCallback

    from qlora.config.schema import LoraSection
    from tasks.train import train_adapter
    from tasks.training.packing import bfd_bins

    work, _, data, base = prepared
    train_rows = load_from_disk(data.path)["train"]
    bins = bfd_bins([len(x) for x in train_rows["input_ids"]], 64)  # data.max_length of the fixture
    seen: list[tuple[tuple, int]] = []

    class Batches(TrainerCallback):  # the collated micro-batches the model sees: (shape, position restarts)
        def on_train_begin(self, args, state, control, model=None, **kw):
            model.register_forward_pre_hook(lambda m, a, k: seen.append(
                (tuple(k["input_ids"].shape), int((k["position_ids"] == 0).sum()))) if m.training else None, with_kwargs=True)

    train = TrainConfig(packing="bfd", num_train_epochs=1, per_device_train_batch_size=16, gradient_accumulation_steps=1,
                        learning_rate=1e-3, logging_steps=5, save_steps=1000)
    with caplog.at_level(logging.INFO, logger="qlora.train"):
        a = train_adapter(base, data, LoraSection(r=8, alpha=16, dropout=0.0), train, work, callbacks=(Batches(),))
    assert f"train.packing=bfd: {len(train_rows)} rows -> {len(bins)} bins of <= 64 tokens" in caplog.text
    assert len(bins) < 0.6 * len(train_rows)  # ~25-token demo rows: two or more per bin
    assert a.global_step == math.ceil(len(bins) / 16) == len(seen)
    assert all(b <= 16 and width <= 64 for (b, width), _ in seen) and seen[0][0][0] == 16
    pads = sum(b * width for (b, width), _ in seen) - sum(len(x) for x in train_rows["input_ids"])
    assert 0 <= pads < 0.05 * sum(b * width for (b, width), _ in seen)  # full bins: little padding
    assert sum(restarts for _, restarts in seen) - pads == len(train_rows)  # every row once, as its own sequence
    assert a.last_loss < a.first_loss


@pytest.mark.slow  # FlexAttention compiles on first use: ~17 s in a fresh clone
def test_flex_attention_keeps_packed_examples_apart_like_sdpa(tiny_base):
    """model.attn_implementation=flex_attention on bfd bins: the same logits as sdpa (transformers turns the
    position restarts into FlexAttention's block mask, so only blocks inside each example are computed on a GPU).
    Forward only: FlexAttention has no backward on a CPU (see the next test)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from tasks.training.packing import pack_bfd
    from tasks.training.recipe import collator

    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_base)))
    prep = prepare_data(DataConfig(path=str(SHARED_DATA / "sharegpt_dummy_conversation.json"), max_length=160), tok)
    bins = pack_bfd(Dataset.from_list([{k: prep.train[i][k] for k in ("input_ids", "labels")} for i in range(6)]), 320)
    batch = collator(tok, "bfd")([bins[i] for i in range(len(bins))])
    logits = {}
    for attn in ("sdpa", "flex_attention"):
        model = AutoModelForCausalLM.from_pretrained(str(tiny_base), attn_implementation=attn, dtype=torch.float32).eval()
        model.config.use_cache = False
        with torch.no_grad():
            logits[attn] = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    real = batch["labels"] != -100  # positions whose prediction is trained (pad tails differ in nothing that counts)
    assert torch.allclose(logits["flex_attention"][real], logits["sdpa"][real], atol=1e-4)


def test_training_with_flex_attention_on_a_cpu_is_refused_before_loading(prepared):
    """torch 2.13's FlexAttention has no backward on a CPU: refused at the start of training, naming the key,
    before any model loads (not a NotImplementedError from the first backward); nothing is written."""
    import torch

    from qlora.config.schema import LoraSection
    from qlora.errors import ConfigError
    from tasks.train import run_dir_for, train_adapter

    if torch.cuda.is_available():
        pytest.skip("FlexAttention trains on a GPU")
    work, _, data, base = prepared
    flex = base.model_copy(update={"attn_implementation": "flex_attention"})
    lora, train = LoraSection(r=4, alpha=8), TrainConfig(max_steps=2)
    with pytest.raises(ConfigError, match=r"model\.attn_implementation=flex_attention trains on a GPU only.*Use sdpa"):
        train_adapter(flex, data, lora, train, work)
    assert not list(run_dir_for(flex, data, lora, train, work).glob("checkpoint-*"))
