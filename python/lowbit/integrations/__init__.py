"""lowbit inside other libraries' workflows: transformers (``from_pretrained``
with ``quantization_config=lowbit.LowbitConfig(...)``, pre-quantized checkpoints)."""
