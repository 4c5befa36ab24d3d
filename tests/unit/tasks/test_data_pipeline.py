"""One data path for one source and for a mixture: what a single source gets, a mixture gets too."""

import json

import pytest

from qlora.config.schema import DataConfig, DataSource, ModelConfig
from qlora.errors import DataError
from qlora.models import is_hub_id, load_tokenizer
from tasks.data.pipeline import prepare_data
from tests.conftest import SHARED_DATA
from tests.families import family_base  # noqa: F401

ROWS = json.loads((SHARED_DATA / "sharegpt_dummy_conversation.json").read_text())


def _conversations(tmp_path, n=12) -> str:
    path = tmp_path / "conversations.json"
    path.write_text(json.dumps(ROWS[:n], indent=1))
    return str(path)


def _single_and_mixture(path: str, **extra) -> tuple[DataConfig, DataConfig]:
    common = dict(max_length=512, eval_fraction=0.25, **extra)
    return (DataConfig(path=path, format="sharegpt", **common),
            DataConfig(path=None, sources=[DataSource(path=path, format="sharegpt", weight=1.0)], **common))


def test_a_mixture_registers_the_prompt_with_chat_template_kwargs(family_base, tmp_path):
    """Before: the mixture built the consumer's prompt template without data.chat_template_kwargs, so a
    Qwen3 mixture trained with enable_thinking registered a prompt that did not lead into what it trained."""
    tok = load_tokenizer(ModelConfig(name_or_path=str(family_base("qwen3"))))
    single, mixture = _single_and_mixture(_conversations(tmp_path), chat_template_kwargs={"enable_thinking": False})
    one, mixed = prepare_data(single, tok), prepare_data(mixture, tok)
    assert one.prompt_template.endswith("<think>\n\n</think>\n\n")  # thinking off: the empty block is in the prompt
    assert mixed.prompt_template == one.prompt_template


def test_a_mixture_reports_rows_expanded(family_base, tmp_path):
    """Before: a mixture never passed rows_expanded to the report, which always said 0."""
    tok = load_tokenizer(ModelConfig(name_or_path=str(family_base("qwen3"))))
    single, mixture = _single_and_mixture(_conversations(tmp_path))
    one, mixed = prepare_data(single, tok), prepare_data(mixture, tok)
    assert one.report.rows_expanded > 0
    assert mixed.report.rows_expanded == one.report.rows_expanded
    assert mixed.report.metrics()["data/rows_expanded"] == one.report.rows_expanded


@pytest.mark.parametrize("name, data, model", [
    ("teknium/OpenHermes-2.5", True, True),
    ("meta-llama/Llama-3.1-8B-Instruct", True, True),
    ("org/name_with.dots-and_dashes", True, True),
    ("gpt2", False, True),  # a bare name: a model hub id; for data far more often a mistyped local file
    ("data/train.jsonl", False, False),
    ("owner/train.jsonl", False, False),
    ("./owner/name", False, False),
    ("/abs/path", False, False),
    ("a/b/c", False, False),
    ("bad id with spaces", False, False),
])
def test_one_hub_id_rule_for_data_and_models(name, data, model):
    assert is_hub_id(name, owner_required=True) is data
    assert is_hub_id(name) is model


def test_an_existing_local_path_wins_over_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner").mkdir()
    (tmp_path / "owner" / "name-2.5").write_text("")
    assert not is_hub_id("owner/name-2.5") and not is_hub_id("owner/name-2.5", owner_required=True)


def test_a_dotted_hub_dataset_id_is_loaded_from_the_hub_not_called_a_missing_file(tiny_base, monkeypatch):
    """Before: a dataset id with a dot (teknium/OpenHermes-2.5) was reported as "data file not found"."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # HF_HUB_OFFLINE=1 too (conftest): the load must fail, as a hub load
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_base)))
    with pytest.raises(DataError, match=r"^teknium/OpenHermes-2\.5: cannot load hub dataset") as e:
        prepare_data(DataConfig(path="teknium/OpenHermes-2.5"), tok)
    assert "data file not found" not in str(e.value)
