"""Quantized formats of the layers: kv_cache.py (--kv-cache-dtype: how an attention layer's cache
holds K/V), and the weight formats of the linear layers (--quantization)."""
