"""--tensor-parallel-size 2 on the CPU (gloo): the model split over two worker processes gives
the greedy tokens of one, for Llama, Qwen2 and Qwen3 shapes, with a single KV head (replicated
on both ranks) and a vocabulary that does not divide by the ranks; the same across two "hosts"
on loopback (--nnodes 2 --node-rank 0|1); and clear errors for splits that cannot work."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import build_tiny, random_prompts
from pagoda import LLM, SamplingParams

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
SEEDED = SamplingParams(temperature=1.0, top_p=0.9, seed=3, max_tokens=8, ignore_eos=True)


def free_ports(n: int = 3) -> int:
    """A base port with the next n - 1 free too (the rendezvous and the engine's two sockets)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n >= 65535:
            continue
        try:
            socks = []
            for p in range(base, base + n):
                t = socket.socket()
                t.bind(("127.0.0.1", p))
                socks.append(t)
            for t in socks:
                t.close()
            return base
        except OSError:
            for t in socks:
                t.close()
    raise RuntimeError("no free port range")


def outputs(llm, prompts):
    params = [GREEDY if i % 3 else SEEDED for i in range(len(prompts))]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(6, 5, 50, 49152, seed=31)


@pytest.mark.parametrize("kind,overrides", [
    ("llama", {}),
    ("qwen2", {"num_key_value_heads": 1}),          # one KV head: replicated on both ranks
    ("qwen3", {"vocab_size": 49153}),               # 49153 rows: the ranks' slices are padded
])
def test_tp2_equals_tp1(kind, overrides, prompts, tmp_path, smollm_side_dir):
    path = build_tiny(kind, str(tmp_path / kind), smollm_side_dir, **overrides)
    one = outputs(LLM(path, max_model_len=256), prompts)
    llm = LLM(path, max_model_len=256, tensor_parallel_size=2, master_port=free_ports())
    try:
        attn = llm.llm_engine.core.worker.model.layers[0].self_attn
        assert (attn.num_heads, attn.num_kv_heads) == (2, 1)  # 4 heads, 2 (or 1) KV heads over 2 ranks
        assert outputs(llm, prompts) == one
    finally:
        llm.shutdown()


def test_int4_tp2_equals_tp1(prompts, tiny_llama_dir):
    """--quantization int4 with two ranks: each packs its slice of the floats as Q4_1 blocks
    (32 weights along K, so a row-parallel rank's blocks are the full row's), and the packed
    kernels behind the column/row-parallel layers and the vocab-parallel head give one rank's
    tokens."""
    one = outputs(LLM(tiny_llama_dir, max_model_len=256, quantization="int4"), prompts)
    llm = LLM(tiny_llama_dir, max_model_len=256, quantization="int4", tensor_parallel_size=2,
              master_port=free_ports())
    try:
        model = llm.llm_engine.core.worker.model
        assert model.layers[0].mlp.down_proj.gguf is not None and model.lm_head.gguf is not None
        assert outputs(llm, prompts) == one
    finally:
        llm.shutdown()


def test_two_hosts_on_loopback(prompts, tiny_llama_dir):
    """Rank 1 started as its own `pagoda serve --node-rank 1` (as on a second machine)."""
    port = free_ports()
    one = outputs(LLM(tiny_llama_dir, max_model_len=256), prompts)
    node1 = subprocess.Popen([sys.executable, "-m", "pagoda.entrypoints.cli", "serve", tiny_llama_dir,
                              "--max-model-len", "256", "--tensor-parallel-size", "2", "--nnodes", "2",
                              "--node-rank", "1", "--master-port", str(port)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ})
    try:
        llm = LLM(tiny_llama_dir, max_model_len=256, tensor_parallel_size=2, nnodes=2, node_rank=0,
                  master_port=port)
        assert outputs(llm, prompts) == one
        llm.shutdown()
        node1.wait(30)
        assert node1.returncode == 0, node1.stdout.read().decode()[-2000:]
    finally:
        if node1.poll() is None:
            node1.kill()


def test_splits_that_cannot_work_are_clear_errors(tiny_llama_dir):
    # 4 heads, 2 KV heads: 3 ranks split neither
    with pytest.raises(Exception, match="tensor-parallel-size"):
        LLM(tiny_llama_dir, max_model_len=256, tensor_parallel_size=3, master_port=free_ports())
    with pytest.raises(ValueError, match="--nnodes"):
        LLM(tiny_llama_dir, tensor_parallel_size=3, nnodes=2)
