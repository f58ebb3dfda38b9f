"""Vision-language models against transformers on tiny random checkpoints (fp32, CPU): LLaVA,
Qwen2-VL, Qwen2.5-VL, Idefics3, SmolVLM. One batch mixes a text-only prompt with one image,
two images of different sizes in one prompt, and wide, tall and tiny images; the same prompts
then run with chunked prefill so chunks start and end inside images' placeholder ranges."""
from __future__ import annotations

import pytest

from pagoda import LLM
from vlm_utils import KINDS, cases_for, check_against_hf, hf_model


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_and_logprobs_match_transformers(kind, request):
    path = request.getfixturevalue(f"tiny_{kind}_dir")
    hf = hf_model(path)
    llm = LLM(path, max_model_len=1024, num_gpu_blocks_override=256)
    outs = check_against_hf(kind, path, llm, cases_for(kind), hf=hf)
    assert len({len(o.prompt_token_ids) for o in outs}) > 3  # the images expanded differently
    # chunked prefill: 7-token chunks over 4-token pages split every image's placeholders
    chunked = LLM(path, max_model_len=1024, num_gpu_blocks_override=256, max_num_batched_tokens=7,
                  block_size=4, enable_prefix_caching=False)
    check_against_hf(kind, path, chunked, cases_for(kind)[1:3], hf=hf)


def test_mrope_decode_through_the_graph_runner(tiny_qwen2_vl_dir):
    """Decode steps of an M-RoPE model replayed through the CUDA-graph runner's buffers (run
    eagerly here: capture=False on the CPU) rotate at position + delta, which an image makes
    differ from the sequence position."""
    path = tiny_qwen2_vl_dir
    llm = LLM(path, max_model_len=1024, num_gpu_blocks_override=256)
    runner = llm.llm_engine.core.worker.runner
    runner.capture_cuda_graphs(8, 1024, capture=False)
    calls = []
    run = runner.graph_runner.run

    def spy(ids, pos, *a, rope_pos=None, **kw):
        calls.append((pos.copy(), None if rope_pos is None else rope_pos.copy()))
        return run(ids, pos, *a, rope_pos=rope_pos, **kw)
    runner.graph_runner.run = spy
    check_against_hf("qwen2_vl", path, llm, cases_for("qwen2_vl")[:4])
    assert calls  # decode steps went through the runner
    # the image prompts' rotary positions run behind their sequence positions there
    assert any(rope is not None and (rope < pos).any() for pos, rope in calls)
