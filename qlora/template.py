"""The prompt template: one function for training, evaluation and the registry's consumers.

``PROMPT_TEMPLATE`` is also handed to ``mlflow.transformers.log_model(prompt_template=...)``, so a
consumer calling ``predict(["<instruction>"])`` on ``models:/<name>@champion`` gets exactly the prompt
the adapter was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

from qlora.errors import ConfigError

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
# ``kwargs`` are extra template variables (data.chat_template_kwargs, e.g. enable_thinking), passed
# to every rendering: training, evaluation prompts and the prompt template logged for consumers.

Turn = tuple[str, str]  # (role, content)
Segment = tuple[str, bool]  # (text, trained?)
_SENTINEL = "\x00QLORA_PROMPT\x00"


class TemplateError(ValueError):
    """A conversation the chat template cannot render into prompt + answer (the row is dropped)."""


class NotPrefixStable(TemplateError):
    """The template renders a conversation differently once it continues (e.g. Qwen3 strips earlier thinking)."""


@dataclass
class Example:
    """One training example: segments to tokenize, and what its eval prompt answers."""

    segments: list[Segment]
    answer_turn: int  # index in the turns of the assistant answer ``prompt`` leads into (the last one trained)
    prompt: str  # the conversation before that answer as a consumer's request renders (``conversation_prompt``)
    message: str  # the user message before it, as a consumer sends it (the logged prompt template is applied to it)
    standalone: bool  # the prompt is exactly what a consumer gets for ``message`` alone (no history, no system turn)


def chat_template_of(tok, fallback: str | None) -> str | None:
    own = getattr(tok, "chat_template", None) if tok is not None else None
    return own or fallback


def template_kwargs(tok, fallback: str | None, configured: dict | None) -> dict:
    """``data.chat_template_kwargs`` when set; otherwise ``enable_thinking=False`` for templates that read it
    (Qwen3): without it Qwen3's template puts an empty ``<think></think>`` block into every single-turn
    answer, which training would then teach, while a consumer never sees one."""
    if configured is not None:
        return dict(configured)
    template = chat_template_of(tok, fallback)
    return {"enable_thinking": False} if template and "enable_thinking" in template else {}


def adds_bos(tok) -> bool:
    """Does the tokenizer prepend BOS by itself (Llama, Mistral)?"""
    return tok.bos_token_id is not None and tok("a")["input_ids"][:1] == [tok.bos_token_id]


def _apply(tok, template: str, turns: list[Turn], generation_prompt: bool, kwargs: dict, strip_bos: bool) -> str:
    import jinja2

    msgs = [{"role": r, "content": c} for r, c in turns]
    try:
        text = tok.apply_chat_template(msgs, chat_template=template, tokenize=False,
                                       add_generation_prompt=generation_prompt, **kwargs)
    except jinja2.TemplateSyntaxError as e:  # the template itself is broken: no row can be rendered
        raise ConfigError(f"the chat template (data.chat_template, or the tokenizer's own) does not parse: {e}") from None
    except jinja2.TemplateError as e:  # raise_exception() in the template (e.g. Mistral's role check)
        raise TemplateError(f"the chat template refuses this conversation: {e}") from None
    # Llama-3 and Mistral templates write BOS and their tokenizers add it again: keep the tokenizer's
    # one, so ``tok(prompt)`` at inference (MLflow's pipeline, evaluation) gives the ids training saw.
    return text[len(tok.bos_token):] if strip_bos and text.startswith(tok.bos_token) else text


def render_turns(turns: list[Turn], tok=None, fallback: str | None = None, kwargs: dict | None = None) -> list[Segment]:
    """Turns as (text, trained) segments: each assistant turn (with its end-of-turn marker) is trained.

    The untrained segment before an assistant turn is exactly what ``inference_prompt`` produces for
    the same conversation so far, so what is trained is what a consumer's prompt leads into. Raises
    ``NotPrefixStable`` when the template renders history differently later in the conversation.
    """
    template = chat_template_of(tok, fallback)
    if template is None:
        return _render_builtin(turns)
    kwargs, strip = kwargs or {}, adds_bos(tok)
    out: list[Segment] = []
    done = ""  # text rendered so far
    for k, (role, content) in enumerate(turns):
        if role != "assistant":
            continue
        before = _apply(tok, template, turns[:k], True, kwargs, strip)
        through = _apply(tok, template, turns[: k + 1], False, kwargs, strip)
        if not before.startswith(done) or not through.startswith(before):
            raise NotPrefixStable("the chat template does not render a conversation as a prefix of its continuation")
        answer = through[len(before):]
        trained = answer.rstrip()  # trailing newlines after the end-of-turn marker are layout, not answer
        out.append((before[len(done):], False))
        out.append((trained, True))
        done = before + trained
    return out


def _per_turn(turns: list[Turn], tok, template: str, kwargs: dict) -> list[list[Segment]]:
    """One example per assistant turn: the conversation so far as an untrained prompt (rendered as at
    inference) and that one answer trained. For templates that are not prefix-stable: Qwen3 renders
    an earlier answer without its thinking once a later user turn follows."""
    strip, out = adds_bos(tok), []
    for k, (role, _) in enumerate(turns):
        if role != "assistant":
            continue
        before = _apply(tok, template, turns[:k], True, kwargs, strip)
        through = _apply(tok, template, turns[: k + 1], False, kwargs, strip)
        out.append([(before, False), (_answer(tok, template, turns, k, before, through, kwargs, strip), True)])
    return out


def _answer(tok, template: str, turns: list[Turn], k: int, before: str, through: str, kwargs: dict, strip: bool) -> str:
    """Assistant turn ``k`` as the template writes it after its prompt. Mistral's template writes the system
    message into the *last* user turn only, so once the answer follows, the prompt renders without it: the
    answer is then cut from the conversation rendered without its system turn, while the prompt stays the
    one a consumer's request renders (system folded in), as training and serving must agree on."""
    if through.startswith(before):
        return through[len(before):].rstrip()
    if turns and turns[0][0] == "system" and k > 1:
        rest = turns[1:]
        before_ns = _apply(tok, template, rest[: k - 1], True, kwargs, strip)
        through_ns = _apply(tok, template, rest[:k], False, kwargs, strip)
        if through_ns.startswith(before_ns):
            return through_ns[len(before_ns):].rstrip()
    raise TemplateError(
        f"the chat template renders the prompt of assistant turn {k} differently once the answer follows, even "
        "without the system turn; the answer cannot be told apart from the prompt. Set data.chat_template to a "
        "template that renders a prompt as a prefix of its answer"
    )


def render_examples(turns: list[Turn], tok=None, fallback: str | None = None, kwargs: dict | None = None) -> list[Example]:
    """The training examples of one conversation: the whole conversation as one example when the
    template is prefix-stable, else one example per assistant turn (history untrained)."""
    answers = [k for k, (r, _) in enumerate(turns) if r == "assistant"]
    builtin = chat_template_of(tok, fallback) is None

    def example(segs: list[Segment], k: int, prompt: str | None = None) -> Example:
        message = turns[k - 1][1]
        # The built-in template strips the message; so must the consumer's copy to get the same prompt.
        return Example(segs, k, segs[0][0] if prompt is None else prompt, message.strip() if builtin else message,
                       standalone=k == 1)

    try:
        segments = render_turns(turns, tok, fallback, kwargs)
    except NotPrefixStable:
        template = chat_template_of(tok, fallback)
        return [example(segs, k) for segs, k in zip(_per_turn(turns, tok, template, kwargs or {}), answers)]
    # Evaluation scores the turn training taught last: the last answer given the whole conversation before
    # it, which is the segments before that answer (render_turns made each prefix the consumer's rendering).
    return [example(segments, answers[-1], "".join(text for text, _ in segments[:-1]))]


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


def conversation_prompt(turns: list[Turn], tok=None, fallback: str | None = None, kwargs: dict | None = None) -> str:
    """The text a consumer's conversation (ending with a user turn) becomes: the model generates the next
    assistant turn from it. Rendered as training rendered the same turns before an answer."""
    template = chat_template_of(tok, fallback)
    if template is None:
        return "".join(text for text, _ in _render_builtin(turns))
    return _apply(tok, template, turns, True, kwargs or {}, adds_bos(tok))


def inference_prompt(message: str, tok=None, fallback: str | None = None, system: str | None = None,
                     kwargs: dict | None = None) -> str:
    """The text a consumer feeds the model for one user message (generation prompt included)."""
    turns: list[Turn] = ([("system", system)] if system else []) + [("user", message)]
    return conversation_prompt(turns, tok, fallback, kwargs)


def prompt_template_for(tok=None, fallback: str | None = None, kwargs: dict | None = None) -> str:
    """``inference_prompt`` as a one-placeholder string for ``mlflow.transformers.log_model(prompt_template=)``."""
    text = inference_prompt(_SENTINEL, tok, fallback, kwargs=kwargs)
    return text.replace("{", "{{").replace("}", "}}").replace(_SENTINEL, "{prompt}")
