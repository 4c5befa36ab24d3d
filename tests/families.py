"""Tiny models in the conventions of the families users fine-tune: Llama-3.1, Qwen2.5, Qwen3, Mistral.

Built on the CPU in about a second each and never downloaded: the family's real config class
(2 layers, 64 wide, random weights), a byte-level BPE tokenizer trained here on the shared data,
the family's real special tokens (ids differ, names and roles do not: which one is BOS, EOS, pad or
none), its generation_config defaults, and its chat template written as Jinja text to the real
template's conventions (written for these tests, not copied):

- Llama-3.1-Instruct: ``<|begin_of_text|>`` added by the tokenizer *and* written by the template, a
  system header with the "Cutting Knowledge Date" / "Today Date" lines even without a system
  message, ``<|eot_id|>`` ends each turn and is the EOS; no pad token; sampling defaults.
- Qwen2.5-Instruct: ChatML (``<|im_start|>role\\n...<|im_end|>\\n``), the default system prompt
  "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."; EOS ``<|im_end|>``,
  pad ``<|endoftext|>``, no BOS.
- Qwen3: ChatML without a default system prompt; the assistant turn after the last user message
  gets a ``<think>\\n...\\n</think>\\n\\n`` block, earlier turns have their thinking stripped (so a
  conversation is not a prefix of its continuation), and ``enable_thinking=false`` puts an empty
  think block into the generation prompt. ``<think>``/``</think>`` are added tokens but not special.
- Mistral-Instruct (v0.3 style): ``<s>[INST] ...[/INST] answer</s>``, roles must alternate
  (``raise_exception``), the system message goes into the *last* user turn; no pad token.

Imported by test modules like ``registry_fixtures``: ``from tests.families import family_base``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import SHARED_DATA

LLAMA31_TEMPLATE = """{{- bos_token }}
{%- if date_string is not defined %}{%- set date_string = "26 Jul 2024" %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message + "<|eot_id|>" }}
{%- for message in messages %}
    {{- "<|start_header_id|>" + message['role'] + "<|end_header_id|>\\n\\n" + message['content'] | trim + "<|eot_id|>" }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- "<|start_header_id|>assistant<|end_header_id|>\\n\\n" }}
{%- endif %}
"""

QWEN25_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message['role'] == 'user' or (message['role'] == 'system' and not loop.first) or message['role'] == 'assistant' %}
        {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

QWEN3_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_query_index=messages|length - 1, found=false) %}
{%- for message in messages[::-1] %}
    {%- if not ns.found and message['role'] == 'user' %}
        {%- set ns.found = true %}
        {%- set ns.last_query_index = messages|length - 1 - loop.index0 %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message['content'] %}
    {%- if message['role'] == 'user' or (message['role'] == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}
    {%- elif message['role'] == 'assistant' %}
        {%- set reasoning = '' %}
        {%- if '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning) %}
            {{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
        {%- else %}
            {{- '<|im_start|>assistant\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

MISTRAL_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.last and system_message is defined %}
            {{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}
        {%- else %}
            {{- '[INST] ' + message['content'] + '[/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] | trim + eos_token }}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""

# name -> how the real family is put together. "special": added special tokens in id order;
# "tokens": which of them the tokenizer calls bos/eos/pad (None: the family has none);
# "stop": generation_config.eos_token_id (several for the instruct models); "sampling": its defaults.
FAMILIES: dict[str, dict] = {
    "llama-3.1": dict(
        config="LlamaConfig", template=LLAMA31_TEMPLATE, adds_bos=True,
        special=["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
                 "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"],
        tokens=dict(bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None),
        stop=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"], max_positions=131072,
        sampling=dict(do_sample=True, temperature=0.6, top_p=0.9),
        extra=dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    ),
    "qwen2.5": dict(
        config="Qwen2Config", template=QWEN25_TEMPLATE, adds_bos=False,
        special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        tokens=dict(bos=None, eos="<|im_end|>", pad="<|endoftext|>"),
        stop=["<|im_end|>", "<|endoftext|>"],
        sampling=dict(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05),
        extra=dict(rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    ),
    "qwen3": dict(
        config="Qwen3Config", template=QWEN3_TEMPLATE, adds_bos=False,
        special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], plain=["<think>", "</think>"],
        tokens=dict(bos=None, eos="<|im_end|>", pad="<|endoftext|>"),
        stop=["<|im_end|>", "<|endoftext|>"],
        sampling=dict(do_sample=True, temperature=0.6, top_p=0.95, top_k=20),
        extra=dict(head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    ),
    "mistral": dict(
        config="MistralConfig", template=MISTRAL_TEMPLATE, adds_bos=True,
        special=["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
        tokens=dict(bos="<s>", eos="</s>", pad=None, unk="<unk>"),
        stop=["</s>"], sampling={},
        extra=dict(sliding_window=None, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    ),
}
NAMES = tuple(FAMILIES)


def corpus(n: int = 400) -> list[str]:
    """Text of the shared data the tests train on: the tokenizer then covers it in few tokens."""
    convs = json.loads((SHARED_DATA / "sharegpt_dummy_conversation.json").read_text())
    alpaca = json.loads((SHARED_DATA / "code_alpaca_2k.json").read_text())[:n]
    texts = [t["value"] for c in convs for t in c["conversations"]]
    texts += [r["instruction"] + "\n" + r["input"] + "\n" + r["output"] for r in alpaca]
    texts += ["Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024",
              "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.", "system user assistant"]
    return texts


def _tokenizer(spec: dict, vocab_size: int):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=spec["special"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec.get("plain", [])])
    names = spec["tokens"]
    if spec["adds_bos"]:  # Llama-3 and Mistral tokenizers prepend BOS themselves
        bos = names["bos"]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    kw = {f"{k}_token": v for k, v in names.items() if v is not None}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kw)
    fast.chat_template = spec["template"]
    return fast


def build_family(name: str, out: Path, vocab_size: int = 1024, seed: int = 0) -> Path:
    """A tiny random model of family ``name`` saved as an ordinary Hugging Face model folder."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig

    spec = FAMILIES[name]
    tok = _tokenizer(spec, vocab_size)
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in spec["tokens"].items() if v is not None}
    config = getattr(transformers, spec["config"])(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=spec.get("max_positions", 4096), initializer_range=0.1, tie_word_embeddings=False,
        bos_token_id=ids.get("bos"), eos_token_id=ids["eos"], pad_token_id=ids.get("pad"), **spec["extra"],
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    stops = [tok.convert_tokens_to_ids(t) for t in spec["stop"]]
    model.generation_config = GenerationConfig(
        bos_token_id=ids.get("bos"), eos_token_id=stops if len(stops) > 1 else stops[0], pad_token_id=ids.get("pad"),
        **spec["sampling"],
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def family_base(tmp_path_factory):
    """``family_base(name)`` -> the folder of that family's tiny model, built once per session."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build_family(name, tmp_path_factory.mktemp(f"family-{name}"))
        return built[name]

    return get
