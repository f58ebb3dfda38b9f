# Sourced by device-call scripts that need the bundled GGUF or the server wheels, from the repository root.
# The bundled GGUF is carried in two halves (a call carries at most 64 MiB): one call stashes the
# first half and the server wheels in /tmp, the next call on the same warm machine joins them.

stash_first_half_and_wheels() {
  cp .gguf_parts/part_aa /tmp/gguf_a
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
}

join_bundled_gguf() {
  cat /tmp/gguf_a .gguf_parts/part_ab > /tmp/smollm2.gguf
}

gpu_tests() {
  python3 -m pytest -q tests/test_gpu.py -p no:cacheprovider 2>&1 | grep -E "Error|assert|passed|failed" | tail -12
}
