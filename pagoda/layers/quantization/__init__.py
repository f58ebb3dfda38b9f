"""Quantized formats of the layers: kv_cache.py (--kv-cache-dtype: how an attention layer's cache
holds K/V), and the weight formats of the linear layers (--quantization), applied after the
weights are loaded: gguf.py (a GGUF's blocks kept packed on the CPU; int4 on the CPU), fp8.py,
int4.py (W4A16 on CUDA, also what awq.py and gptq.py checkpoints become), checkpoint.py (the
checkpoint's own quantization_config); int8 in pagoda/layers/linear.py."""
