"""Frozen pretrained text encoders in pure JAX (BERT/MiniLM, T5, UMT5), loaded from safetensors
with a strict key/shape table; `jaxsora.text.encoders.load_text_encoder` is the entry point."""
