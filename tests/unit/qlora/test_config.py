
import pytest

from qlora.config.files import load_config
from qlora.config.schema import PipelineConfig
from qlora.errors import ConfigError
from tests.conftest import REPO

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, PipelineConfig)


def test_shipped_configs_exist():
    assert {"demo.yaml", "gpu-example.yaml"} <= {p.name for p in CONFIGS}


def test_defaults_are_qlora_defaults():
    cfg = PipelineConfig()
    assert cfg.train.optim == "auto"  # paged 8-bit AdamW on a GPU (tests/unit/tasks/test_compute_choices.py)
    assert cfg.train.lr_scheduler_type == "cosine"
    assert cfg.train.max_grad_norm == 0.3
    assert cfg.quantization.quant_type == "nf4" and cfg.quantization.double_quant
    assert cfg.quantization.compute_dtype == "auto"
    assert cfg.model.trust_remote_code is False


def test_every_field_has_a_description():
    def walk(model_cls, prefix=""):
        for name, field in model_cls.model_fields.items():
            assert field.description, f"{prefix}{name} has no description"
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann, f"{prefix}{name}.")

    walk(PipelineConfig)


def test_overrides_are_typed_and_nested(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  max_steps: 100\nlora:\n  r: 8\n")
    cfg = load_config(f, ["train.max_steps=5", "lora.target_modules=[q_proj, v_proj]", "model.revision=abc123"])
    assert cfg.train.max_steps == 5
    assert cfg.lora.r == 8
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.model.revision == "abc123"


def test_bad_value_names_the_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  learning_rate: -1\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert f"{f}: train.learning_rate:" in str(e.value)
    assert "-1" in str(e.value)


def test_unknown_key_is_rejected_with_its_path(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lora:\n  rank: 8\n")
    with pytest.raises(ConfigError, match=r"lora\.rank: unknown key"):
        load_config(f)


def test_override_of_unknown_key_is_rejected():
    with pytest.raises(ConfigError, match=r"train\.max_step: unknown key"):
        load_config(None, ["train.max_step=5"])


@pytest.mark.parametrize("key", ["report.webhook_url", "report.webhook_secret", "report.notification_block"])
def test_a_removed_key_says_what_replaced_it(key):
    """Before: these keys made the flow post to a webhook itself; now Prefect automations notify. An old config
    is told so, by key, instead of being refused as a typo."""
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{key}=slack-webhook/ml-team"])
    assert str(e.value).startswith(f"defaults + --set: {key}: removed: notifications are Prefect automations")
    assert "`qlora notifications setup --block TYPE/NAME`" in str(e.value) and "QLORA_NOTIFY_BLOCK" in str(e.value)


def test_malformed_override_says_how():
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(None, ["train.max_steps"])


def test_invalid_yaml_names_the_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  max_steps: 5\n lora: [\n")
    with pytest.raises(ConfigError, match=rf"{f}:\d+: not valid YAML"):
        load_config(f)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("configs/nope.yaml")


def test_warmup_ratio_or_whole_steps():
    assert load_config(None, ["train.warmup_steps=0.1"]).train.warmup_steps == 0.1
    assert load_config(None, ["train.warmup_steps=10"]).train.warmup_steps == 10
    with pytest.raises(ConfigError, match="train.warmup_steps"):
        load_config(None, ["train.warmup_steps=2.5"])


def test_config_is_a_json_schema_for_the_prefect_form():
    schema = PipelineConfig.model_json_schema()
    assert {"model", "quantization", "lora", "data", "train", "eval", "registry", "tracking"} <= set(schema["properties"])


def test_fingerprint_changes_with_values():
    a, b = PipelineConfig(), load_config(None, ["lora.r=8"])
    assert a.fingerprint() == PipelineConfig().fingerprint()
    assert a.fingerprint() != b.fingerprint()


# ------------------------------------------------------------------ train: checked against transformers at load


def test_extra_args_reach_training_arguments(tmp_path):
    import torch

    from tasks.training.recipe import training_arguments

    cfg = load_config(None, ["train.extra_args={adam_beta2: 0.95, neftune_noise_alpha: 5, bf16: false}"])
    args = training_arguments(cfg.train, tmp_path, torch.float32, checkpointing=False, optim="adamw_torch")
    assert args.adam_beta2 == 0.95 and args.neftune_noise_alpha == 5
    assert args.report_to == []  # "none": MLflow is attached as our own callback, nothing else asked for


@pytest.mark.parametrize("override, message", [
    ("train.extra_args={adam_beta2: 0.95, neftune_noise_alph: 5}",
     r"train\.extra_args: .*extra_args\.neftune_noise_alph: not a transformers\.TrainingArguments field \(did you mean neftune_noise_alpha\?\)"),
    ("train.extra_args={learning_rate: 1.0}", r"extra_args\.learning_rate: set train\.learning_rate instead"),
    ("train.extra_args={output_dir: /tmp/x}", r"extra_args\.output_dir: set by the pipeline"),
    ("train.optim=adamw_torch_fuse", r"train\.optim: .*unknown optim 'adamw_torch_fuse' \(did you mean adamw_torch_fused\?\)"),
    ("train.lr_scheduler_type=cosin", r"train\.lr_scheduler_type: .*unknown lr_scheduler_type 'cosin' \(did you mean cosine\?\)"),
    ("train.report_to=[mlflow]", r"train\.report_to: .*MLflow is always on"),
    ("train.report_to=[tensorbord]", r"train\.report_to: .*unknown integration"),
])
def test_training_names_are_checked_when_the_config_loads(override, message):
    """Before: unknown extra keys were refused only as 'unknown key', and a misspelt optimizer or schedule
    surfaced when the train stage built TrainingArguments, after tokenize and quantize had run."""
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_training_choices_that_transformers_knows_load():
    cfg = load_config(None, ["train.optim=adamw_torch", "train.lr_scheduler_type=constant_with_warmup",
                             "train.report_to=[tensorboard]", "train.extra_args={adam_beta2: 0.95}"])
    assert cfg.train.optim == "adamw_torch" and cfg.train.report_to == ["tensorboard"]


def test_defaults_taken_unchecked_are_valid_for_transformers():
    """qlora/config/checks.py skips importing transformers (and torch) for default values; this is why that is safe."""
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    t = PipelineConfig().train
    assert t.optim == "auto" and {"paged_adamw_8bit", "adamw_8bit", "adamw_torch_fused"} <= {o.value for o in OptimizerNames}
    assert t.lr_scheduler_type in {s.value for s in SchedulerType}


# ------------------------------------------------------------------ eval metrics and the gate metric


def test_gate_metric_must_be_evaluated():
    assert PipelineConfig().registry.gate_metric == "auto"
    assert load_config(None, ["eval.metrics=[bleu, perplexity]", "registry.gate_metric=bleu"]).registry.gate_metric == "bleu"
    with pytest.raises(ConfigError, match=r"registry\.gate_metric=chrf compares chrf, but eval\.metrics .* lacks chrf"):
        load_config(None, ["registry.gate_metric=chrf"])
    with pytest.raises(ConfigError, match=r"gate_metric=auto compares exact_match or rouge, .* lacks rouge"):
        load_config(None, ["eval.metrics=[exact_match]"])
    with pytest.raises(ConfigError, match=r"eval\.metrics\.0"):
        load_config(None, ["eval.metrics=[rouge_l]"])


# ------------------------------------------------------------------ the recipes in configs/


def test_every_recipe_opens_with_its_run_command():
    for path in CONFIGS:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and f"configs/{path.name}" in first, f"{path.name}: first line {first!r}"


def test_a_recipe_per_family():
    want = {"llama-3.1-8b.yaml": "meta-llama/Llama-3.1-8B-Instruct", "qwen2.5-7b.yaml": "Qwen/Qwen2.5-7B-Instruct",
            "mistral-7b.yaml": "mistralai/Mistral-7B-Instruct-v0.3", "qwen3-8b.yaml": "Qwen/Qwen3-8B"}
    for name, hub_id in want.items():
        cfg = load_config(CONFIGS[0].parent / name)
        assert cfg.model.name_or_path == hub_id
        assert cfg.registry.gate_metric in ("auto", "rouge") and "rouge" in cfg.eval.metrics


def test_packing_bins_are_checked_when_the_config_loads():
    """train.packing: bfd with bins of packing_tokens (default data.max_length); a row must fit a bin."""
    cfg = load_config(None, ["train.packing=bfd", "train.packing_tokens=2048", "data.max_length=1024"])
    assert cfg.train.packing == "bfd" and cfg.train.packing_tokens == 2048
    assert load_config(None, ["train.packing=true"]).train.packing is True
    with pytest.raises(ConfigError, match=r"train\.packing_tokens=512 is less than data\.max_length=1024: .*raise packing_tokens"):
        load_config(None, ["train.packing=bfd", "train.packing_tokens=512", "data.max_length=1024"])
    with pytest.raises(ConfigError, match=r"train\.packing_tokens=2048 sizes the bins of train\.packing: bfd, but train\.packing is True"):
        load_config(None, ["train.packing=true", "train.packing_tokens=2048"])
    with pytest.raises(ConfigError, match=r"train\.packing"):
        load_config(None, ["train.packing=ffd"])
