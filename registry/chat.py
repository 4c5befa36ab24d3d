"""The conversation contract of a chat model: consumers send ``{"messages": [{"role": ..., "content": ...}, ...]}``
and get the assistant's reply, the conversation rendered by the training template and kwargs.

Mechanism: MLflow's transformers flavor, as for every version (it loads the PEFT adapter on the 4-bit
base, records the base path, the tokenizer, the params schema), with the pyfunc entry point of the
logged model (``python_function.loader_module``) set to this module. ``_load_pyfunc`` loads MLflow's own
transformers pyfunc and puts ``ChatModel`` in front of it, which renders each conversation with
``qlora.template.conversation_prompt`` (the function training and evaluation render with) and hands
the text to the pipeline. ``mlflow.pyfunc.load_model``, ``mlflow models serve`` and ``qlora predict``
all load it so; the loader needs this project importable (installed, as for ``qlora predict``).

Not ``task="llm/v1/chat"``, MLflow's chat task for transformers: it renders with
``tokenizer.apply_chat_template(messages)`` and nothing else, so (1) Llama-3's and Mistral's BOS is
written by the template and added again by the tokenizer (ids training never saw), (2)
``data.chat_template_kwargs`` are not passed (Qwen3 would generate after a prompt without the empty
think block it was trained behind), (3) ``data.chat_template`` for a tokenizer without one is not
used, (4) there is no default system prompt, and (5) the signature is fixed by MLflow (OpenAI's
payload), without this project's params schema and without a real conversation as its example.

Bare strings: ``registry.consumer.predict`` and ``qlora predict`` send a string as one user turn. The
signature is the conversation, so MLflow's schema check refuses a bare list of strings sent straight
to ``model.predict``; send ``{"messages": [{"role": "user", "content": ...}]}``.
"""

from __future__ import annotations

import sys

from qlora.errors import UserError
from qlora.refs import ChatContract
from qlora.template import Turn, conversation_prompt

CHAT_KEY = "qlora_chat"  # logged model metadata: the ChatContract consumers are rendered with
ROLES = ("system", "user", "assistant")


class ConversationError(UserError, ValueError):
    """What a consumer sent is not a conversation this model can answer."""


def turns_of(messages, where: str = "messages") -> list[Turn]:
    """[{role, content}, ...] (or a bare string: one user turn) as turns; raises ConversationError naming the item."""
    if isinstance(messages, str):
        return [("user", messages)]
    if hasattr(messages, "tolist"):  # a numpy array, after MLflow's schema enforcement
        messages = messages.tolist()
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ConversationError(f"{where} must be a non-empty list of {{role, content}} objects, got {type(messages).__name__}")
    turns: list[Turn] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ConversationError(f"{where}[{i}] must be {{\"role\": one of {list(ROLES)}, \"content\": a string}}, got {m!r}")
        turns.append((m["role"], m["content"]))
    if turns[-1][0] != "user":
        raise ConversationError(f"{where} must end with a user turn (the model writes the next assistant turn); "
                                f"it ends with a {turns[-1][0]!r} turn")
    return turns


def conversations(data) -> list[list[Turn]]:
    """Every conversation in what ``predict`` got: a DataFrame with a ``messages`` column (MLflow's schema
    enforcement makes one), ``{"messages": [...]}``, a list of those, a string or a list of strings."""
    import pandas as pd

    if isinstance(data, pd.DataFrame):
        if "messages" not in data.columns:
            raise ConversationError(f"send {{\"messages\": [{{\"role\": \"user\", \"content\": ...}}]}}; got columns {list(data.columns)}")
        return [turns_of(m, f"messages (row {i})") for i, m in enumerate(data["messages"])]
    if isinstance(data, dict):
        return [turns_of(data.get("messages"))]
    if isinstance(data, str):
        return [turns_of(data)]
    if isinstance(data, (list, tuple)):
        return [turns_of(d if isinstance(d, str) else (d.get("messages") if isinstance(d, dict) else d), f"input {i}")
                for i, d in enumerate(data)]
    raise ConversationError(f"cannot read a conversation from {type(data).__name__}")


def with_default_system(turns: list[Turn], contract: ChatContract) -> list[Turn]:
    """The training data's one system prompt in front of a conversation that brings none."""
    if contract.system is not None and turns[0][0] != "system":
        return [("system", contract.system)] + turns
    return turns


class ChatModel:
    """MLflow's transformers pyfunc behind the conversation contract."""

    def __init__(self, inner, contract: ChatContract):
        self.inner, self.contract = inner, contract

    def render(self, turns: list[Turn]) -> str:
        tok = self.inner.pipeline.tokenizer
        return conversation_prompt(with_default_system(turns, self.contract), tok, self.contract.chat_template,
                                   self.contract.kwargs)

    def predict(self, data, params: dict | None = None) -> list[str]:
        from mlflow.exceptions import MlflowException

        try:
            prompts = [self.render(t) for t in conversations(data)]
        except (ConversationError, ValueError) as e:  # ValueError: the template refused (raise_exception)
            raise MlflowException.invalid_parameter_value(str(e)) from None
        return self.inner.predict(prompts, params)

    def get_raw_model(self):
        return self.inner.pipeline


def save_model(path, mlflow_model=None, **kwargs):
    """``mlflow.transformers.save_model``, then this module as the pyfunc loader (``Model.log``'s flavor hook)."""
    import os

    import mlflow

    mlflow.transformers.save_model(path=path, mlflow_model=mlflow_model, **kwargs)
    mlflow_model.flavors["python_function"]["loader_module"] = __name__
    mlflow_model.save(os.path.join(path, "MLmodel"))


def log_model(name: str, chat: ChatContract | None, metadata: dict | None = None, **kwargs):
    """``mlflow.transformers.log_model``; for a chat version (``chat`` set) with this module as its pyfunc loader
    and the conversation contract in the metadata (``qlora_chat``)."""
    import mlflow
    from mlflow.models import Model

    if chat is None:
        return mlflow.transformers.log_model(name=name, metadata=metadata, **kwargs)
    return Model.log(artifact_path=None, name=name, flavor=sys.modules[__name__],
                     metadata=(metadata or {}) | {CHAT_KEY: chat.model_dump()}, **kwargs)


def _load_pyfunc(path, model_config: dict | None = None):
    """The pyfunc loader MLflow calls for a chat version (``python_function.loader_module``)."""
    from mlflow.models import Model
    from mlflow.transformers import _load_pyfunc as load_transformers

    contract = ChatContract(**Model.load(path).metadata[CHAT_KEY])
    return ChatModel(load_transformers(path, model_config), contract)


def contract_of(model_uri: str) -> ChatContract | None:
    """The version's conversation contract, or None for a version that takes bare prompts (the demo)."""
    import mlflow

    got = (mlflow.models.Model.load(model_uri).metadata or {}).get(CHAT_KEY)
    return ChatContract(**got) if got is not None else None
