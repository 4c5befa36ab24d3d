"""The embedded demo: a synthetic task and a tiny Llama base, both built deterministically.

No weights can be downloaded on the machines this must run on, so the demo's base model is built
here from a fixed seed (random weights, a BPE tokenizer trained on the demo corpus) and saved as an
ordinary Hugging Face model directory. The pipeline then loads it through ``from_pretrained`` like
any other checkpoint: nothing downstream knows it is the demo.

The task, reversing the order of three words, is one a random base cannot do (exact match 0) and
a LoRA adapter learns in under two CPU minutes. Measured here, 1000 steps of 16 on all linear
layers: 3-word rows reach 0.67 exact match with r=32 and 1.00 with r=64; 3-5 word rows stay
below 0.1 with r=32 in that budget, so the demo uses three words and r=64.

The input embedding and the output head are tied, as in the small Llama 3.2, Qwen2.5 and Gemma
bases: copying a word then needs no learnt map from a random embedding to an unrelated random
output row. Measured on a 2-core Intel Xeon (bf16, seed 42, batch 16, 200 held-out rows): tied, fused
AdamW, a 900-step schedule: exact match 0.805 at step 600, 0.965 at 900; untied, the old 1,800-step
recipe: 0.34 at 600, 0.855 at 900, 0.95 only at 1,100. docs/benchmarks.md has the grid.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from qlora.template import format_prompt, user_message

DEMO_DATA = Path("data/demo/reverse_words.jsonl")
INSTRUCTION = "Reverse the order of these words:"
# Short, common words: each becomes one BPE token, so the task is about order, not spelling.
WORDS = (
    "apple river stone cloud green quick lamp tiger music paper orange silver window garden "
    "yellow rabbit forest candle bread honey winter summer ocean pencil castle dragon violet "
    "mirror planet rocket shadow thunder coffee butter pepper marble falcon velvet copper "
    "meadow lemon cotton harbor puzzle ladder jungle island canyon desert comet spider"
).split()


def reversal_rows(n: int = 6000, seed: int = 0, min_words: int = 3, max_words: int = 3) -> list[dict]:
    """Unique Alpaca rows {instruction, input, output}: output is input with word order reversed."""
    rng = random.Random(seed)
    seen: set[str] = set()
    rows = []
    while len(rows) < n:
        words = rng.sample(WORDS, rng.randint(min_words, max_words))
        text = " ".join(words)
        if text in seen:
            continue
        seen.add(text)
        # Words on the instruction line, after a space: each word then has one token form
        # ("Ġapple") in the prompt and in the answer, so the task is order, not spelling.
        rows.append({"instruction": f"{INSTRUCTION} {text}", "input": "", "output": " ".join(reversed(words))})
    return rows


def write_demo_data(path: Path = DEMO_DATA, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in reversal_rows(**kw)), encoding="utf-8")
    return path


def _train_tokenizer(corpus: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    # Llama-style: BOS prepended to every sequence; EOS is appended by the tokenize stage.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def build_demo_base(
    out_dir: str | Path,
    data_path: str | Path = DEMO_DATA,
    *,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    vocab_size: int = 512,
    initializer_range: float = 0.1,
    tie_word_embeddings: bool = True,
    seed: int = 0,
    max_positions: int = 512,
) -> Path:
    """Write a randomly initialised Llama + trained tokenizer to ``out_dir`` (a normal HF model dir).

    ``initializer_range`` 0.1 rather than Llama's 0.02: measured here, LoRA on a frozen random base
    learns the demo task much faster when the random attention is not flat (2-3x lower loss at 200
    steps with 3-5 word rows).
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    rows = [json.loads(line) for line in Path(data_path).read_text(encoding="utf-8").splitlines() if line.strip()]
    corpus = [format_prompt(user_message(r["instruction"], r.get("input"))) + r["output"] for r in rows]
    tokenizer = _train_tokenizer(corpus, vocab_size)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
