"""Weight formats of the linear layers (--quantization), applied after the weights are loaded
(pagoda/worker/loader.py `quantize_weights`): gguf.py (a GGUF's blocks kept packed on the CPU;
int4), and int8 in pagoda/layers/linear.py."""
