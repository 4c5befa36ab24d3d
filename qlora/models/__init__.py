"""Models: ``loading`` is every model and tokenizer load (base, tuned adapter, merged), ``source`` where a
base comes from (local folder or hub id) and what a failed load means, ``quant`` the one quantization
builder (BitsAndBytesConfig, compute dtype, device map), ``secrets`` the hub token and webhook URL."""
