"""Images and the caches: the encoder cache (an image is encoded once, however many requests or
chunks need it), the prefix cache (block keys carry the images' hashes: the same image shares
KV, a different image with the same text shares none past it) and the encoder budget
(--vision-max-batch-size images per step)."""
from __future__ import annotations

import pytest

from pagoda import LLM, SamplingParams
from vlm_utils import PLACEHOLDER, check_against_hf, hf_model, random_image

SP = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=5)
BLOCK = 4


def _llm(path, **kw):
    kw = dict(dict(max_model_len=512, num_gpu_blocks_override=256, block_size=BLOCK), **kw)
    return LLM(path, **kw)


def _count_encoder_runs(llm) -> list[int]:
    """Wraps the worker's encoder: returns the list that gets each run's number of images."""
    enc = llm.llm_engine.core.worker.runner.encoders
    runs: list[int] = []
    original = enc.encode

    def encode(todo):
        if todo:
            runs.append(len(todo))
        return original(todo)
    enc.encode = encode
    return runs


def _prompt(kind, text, images):
    return {"prompt": text, "multi_modal_data": {"image": images}}


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_same_image_twice_is_encoded_once(tiny_qwen2_vl_dir, prefix_caching):
    llm = _llm(tiny_qwen2_vl_dir, enable_prefix_caching=prefix_caching)
    runs = _count_encoder_runs(llm)
    img = random_image(60, 60, 7)
    ph = PLACEHOLDER["qwen2_vl"]
    first = llm.generate(_prompt("qwen2_vl", f"Look: {ph} and say", [img]), SP, use_tqdm=False)[0]
    kv = llm.llm_engine.core.kv_cache_manager
    hits = kv.hits
    # the same image, as another PIL object, with the same text: its KV blocks are reused
    second = llm.generate(_prompt("qwen2_vl", f"Look: {ph} and say", [img.copy()]), SP, use_tqdm=False)[0]
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    assert runs == [1], runs
    stats = llm.llm_engine.core.scheduler.stats()
    assert stats.mm_images_total == 2 and stats.images_encoded_total == 1
    n = len(first.prompt_token_ids)
    if prefix_caching:
        # every full block of the prompt but the last token's came from the cache
        assert kv.hits - hits == (n - 1) // BLOCK * BLOCK
        assert second.num_cached_tokens == (n - 1) // BLOCK * BLOCK
    else:  # no KV reuse: the second request reads the encoder cache
        assert stats.encoder_cache_hits == 1 and second.num_cached_tokens == 0


def test_different_images_share_no_image_blocks(tiny_qwen2_vl_dir):
    path = tiny_qwen2_vl_dir
    ph = PLACEHOLDER["qwen2_vl"]
    text = f"The same words before the picture, and then {ph} the same words after it."
    a, b = random_image(56, 84, 8), random_image(56, 84, 9)
    llm = _llm(path)
    runs = _count_encoder_runs(llm)
    kv = llm.llm_engine.core.kv_cache_manager
    out_a = llm.generate(_prompt("qwen2_vl", text, [a]), SP, use_tqdm=False)[0]
    hits = kv.hits
    out_b = llm.generate(_prompt("qwen2_vl", text, [b]), SP, use_tqdm=False)[0]
    ids = out_a.prompt_token_ids
    assert ids == out_b.prompt_token_ids  # identical tokens: only the image differs
    first_image = ids.index(llm.llm_engine.core.worker.model.image_token_id)
    # only the blocks wholly before the first placeholder are shared
    assert kv.hits - hits == first_image // BLOCK * BLOCK
    assert runs == [1, 1]
    # each output equals a fresh engine's run of it alone, and transformers'
    for img, out in ((a, out_a), (b, out_b)):
        alone = _llm(path).generate(_prompt("qwen2_vl", text, [img]), SP, use_tqdm=False)[0]
        assert alone.outputs[0].token_ids == out.outputs[0].token_ids
        for x, y in zip(alone.outputs[0].logprobs, out.outputs[0].logprobs):
            assert {t: round(v.logprob, 4) for t, v in x.items()} == {t: round(v.logprob, 4) for t, v in y.items()}
    check_against_hf("qwen2_vl", path, _llm(path), [(text, [a]), (text, [b])])


def test_prefix_hit_inside_an_image_range(tiny_llava_dir):
    """A cached prefix that ends inside an image's placeholders: the rest of them still take
    the image's embeddings (from the encoder cache, or the encoder again) — outputs equal
    transformers'."""
    path = tiny_llava_dir
    img = random_image(28, 28, 10)
    llm = _llm(path)
    runs = _count_encoder_runs(llm)
    llm.generate(_prompt("llava", "Q: <image> first question", [img]), SP, use_tqdm=False)
    kv = llm.llm_engine.core.kv_cache_manager
    hits = kv.hits
    # a longer prompt whose cached blocks end inside the 16 placeholders (prompt of 5 + 16)
    cases = [("Q: <image> second, longer question here", [img])]
    out = check_against_hf("llava", path, llm, cases)[0]
    first = out.prompt_token_ids.index(llm.llm_engine.core.worker.model.image_token_id)
    assert kv.hits - hits > first  # the cache covered some of the image's placeholders
    assert sum(runs) == 1  # and the encoder ran once for both requests


@pytest.mark.parametrize("max_batch", [1, 4])
def test_vision_max_batch_size_bounds_each_step(tiny_idefics3_dir, max_batch):
    path = tiny_idefics3_dir
    llm = _llm(path, vision_max_batch_size=max_batch)
    runs = _count_encoder_runs(llm)
    images = [random_image(20 + 9 * i, 30, 20 + i) for i in range(5)]
    outs = llm.generate([_prompt("idefics3", f"img {i}: <image>.", [im]) for i, im in enumerate(images)],
                        SP, use_tqdm=False)
    assert sum(runs) == 5 and max(runs) <= max_batch
    if max_batch > 1:
        assert max(runs) > 1  # images of different requests are encoded together
    # the same results as one request at a time
    single = _llm(path)
    for i, (im, out) in enumerate(zip(images, outs)):
        ref = single.generate(_prompt("idefics3", f"img {i}: <image>.", [im]), SP, use_tqdm=False)[0]
        assert ref.outputs[0].token_ids == out.outputs[0].token_ids


def test_encoder_outputs_are_freed_when_evicted(tiny_qwen2_vl_dir):
    """The encoder cache is bounded: unreferenced outputs are evicted (least recently released
    first) when new images need room, and the worker frees their tensors."""
    llm = _llm(tiny_qwen2_vl_dir, enable_prefix_caching=False)
    core = llm.llm_engine.core
    cache = core.scheduler.encoders
    cache.capacity = 40  # rows: two 16-row images fit, a third evicts the oldest
    ph = PLACEHOLDER["qwen2_vl"]
    images = [random_image(112, 112, 30 + i) for i in range(3)]
    for im in images:
        llm.generate(_prompt("qwen2_vl", f"{ph} what", [im]), SP, use_tqdm=False)
    worker_cache = core.worker.runner.encoders.cache
    assert len(cache.size) == 2 and cache.used_rows == 32
    llm.generate("flush", SamplingParams(max_tokens=1), use_tqdm=False)  # the worker hears of it
    assert set(worker_cache) == set(cache.size)


def test_start_up_warm_up_leaves_no_trace(tiny_qwen2_vl_dir):
    """The warm-up a CUDA engine runs at start (text-only steps through the M-RoPE path) works on
    the CPU too and leaves no request behind in the runner or its encoder state; image prompts
    still match transformers after it."""
    llm = _llm(tiny_qwen2_vl_dir, max_model_len=1024)
    worker = llm.llm_engine.core.worker
    worker.warm_up()
    assert "warm-up" in worker.startup.phases
    assert not worker.runner.batch.requests and not worker.runner.encoders.requests
    ph = PLACEHOLDER["qwen2_vl"]
    check_against_hf("qwen2_vl", tiny_qwen2_vl_dir, llm,
                     [(f"Describe {ph} briefly.", [random_image(56, 56, 1)]), ("plain text", [])])
