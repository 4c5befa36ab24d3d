"""The prompt template: one function for training, evaluation and the registry's consumers.

``PROMPT_TEMPLATE`` is also handed to ``mlflow.transformers.log_model(prompt_template=...)``, so a
consumer calling ``predict(["<instruction>"])`` on ``models:/<name>@champion`` gets exactly the prompt
the adapter was trained on.
"""

from __future__ import annotations

# A single ``{prompt}`` placeholder is what MLflow's prompt_template accepts.
PROMPT_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"


def user_message(instruction: str, input: str | None = None) -> str:
    """Alpaca's instruction + optional input as the one user message a consumer would send."""
    instruction = instruction.strip()
    return f"{instruction}\n{input.strip()}" if input and input.strip() else instruction


def format_prompt(message: str) -> str:
    """The exact text the model sees before its response."""
    return PROMPT_TEMPLATE.format(prompt=message)


# ---------------------------------------------------------------- conversations
#
# Every data format is normalised to turns (role, content) with roles system|user|assistant, and
# rendered here, so training, evaluation and a registry consumer all see one rendering.
#
# Precedence: the tokenizer's own chat template, else ``data.chat_template`` (a Jinja string in the
# Hugging Face chat-template dialect), else the built-in Alpaca-style ``PROMPT_TEMPLATE``.

Turn = tuple[str, str]  # (role, content)
Segment = tuple[str, bool]  # (text, trained?)
_SENTINEL = "\x00QLORA_PROMPT\x00"


class TemplateError(ValueError):
    """The chat template cannot be split into prompt and response parts (not prefix-stable)."""


def chat_template_of(tok, fallback: str | None) -> str | None:
    own = getattr(tok, "chat_template", None) if tok is not None else None
    return own or fallback


def _apply(tok, template: str, turns: list[Turn], generation_prompt: bool) -> str:
    msgs = [{"role": r, "content": c} for r, c in turns]
    return tok.apply_chat_template(msgs, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt)


def render_turns(turns: list[Turn], tok=None, fallback: str | None = None) -> list[Segment]:
    """Turns as (text, trained) segments: each assistant turn (with its end-of-turn marker) is trained.

    The untrained segment before an assistant turn is exactly what ``inference_prompt`` produces for
    the same conversation so far, so what is trained is what a consumer's prompt leads into.
    """
    template = chat_template_of(tok, fallback)
    if template is None:
        return _render_builtin(turns)
    out: list[Segment] = []
    done = ""  # text rendered so far
    for k, (role, content) in enumerate(turns):
        if role != "assistant":
            continue
        before = _apply(tok, template, turns[:k], generation_prompt=True)
        through = _apply(tok, template, turns[: k + 1], generation_prompt=False)
        if not before.startswith(done) or not through.startswith(before):
            raise TemplateError(
                "the chat template does not render a conversation as a prefix of its continuation; "
                "set data.chat_template to a prefix-stable template"
            )
        answer = through[len(before):]
        trained = answer.rstrip()  # trailing newlines after the end-of-turn marker are layout, not answer
        out.append((before[len(done):], False))
        out.append((trained, True))
        done = before + trained
    return out


def _render_builtin(turns: list[Turn]) -> list[Segment]:
    out: list[Segment] = []
    system = ""
    for role, content in turns:
        if role == "system":
            system = content.strip() + "\n\n"
        elif role == "user":
            out.append((system + format_prompt(content.strip()), False))
            system = ""
        else:
            out.append((content.strip(), True))
    return out


def inference_prompt(message: str, tok=None, fallback: str | None = None, system: str | None = None) -> str:
    """The text a consumer feeds the model for one user message (generation prompt included)."""
    turns: list[Turn] = ([("system", system)] if system else []) + [("user", message)]
    template = chat_template_of(tok, fallback)
    if template is None:
        return _render_builtin(turns)[0][0]
    return _apply(tok, template, turns, generation_prompt=True)


def prompt_template_for(tok=None, fallback: str | None = None) -> str:
    """``inference_prompt`` as a one-placeholder string for ``mlflow.transformers.log_model(prompt_template=)``."""
    text = inference_prompt(_SENTINEL, tok, fallback)
    return text.replace("{", "{{").replace("}", "}}").replace(_SENTINEL, "{prompt}")
