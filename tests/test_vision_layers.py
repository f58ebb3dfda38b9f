"""The pieces under the vision models, against references on random inputs: varlen attention
(one length: no padding, no mask; several: padded and masked), M-RoPE and the ViT's 2-D rotary
against transformers' rotations, and the engine's encoder-cache accounting."""
from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from pagoda.engine.encoder_cache import EncoderCacheManager
from pagoda.kernels.attention import varlen_attention_torch
from pagoda.layers.attention import AttentionMetadata, set_attention_metadata
from pagoda.layers.rotary import MRotaryEmbedding, RotaryEmbedding, VisionRotaryEmbedding


def _naive_varlen(q, k, v, cu, scale):
    out = torch.empty_like(q)
    g = q.shape[1] // k.shape[1]
    for a, b in zip(cu, cu[1:]):
        qs, ks, vs = (x[a:b].transpose(0, 1) for x in (q, k, v))
        ks, vs = ks.repeat_interleave(g, 0), vs.repeat_interleave(g, 0)
        p = torch.softmax(qs @ ks.transpose(-1, -2) * scale, -1)
        out[a:b] = (p @ vs).transpose(0, 1)
    return out


@pytest.mark.parametrize("lens", [[16, 16, 16], [5, 16, 1, 9]])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_varlen_attention(lens, kv_heads):
    torch.manual_seed(0)
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    qkv = torch.randn(cu[-1], 4 + 2 * kv_heads, 8)
    q, k, v = qkv[:, :4], qkv[:, 4:4 + kv_heads], qkv[:, 4 + kv_heads:]  # strided views, as layers give
    got = varlen_attention_torch(q, k, v, torch.tensor(cu, dtype=torch.int32), 0.3, cu)
    assert torch.allclose(got, _naive_varlen(q, k, v, cu, 0.3), atol=1e-5)


def _hf_rotate(q, cos, sin):
    """transformers' apply_rotary_pos_emb: q [T, H, D], cos/sin [T, D]."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import rotate_half
    return q * cos[:, None] + rotate_half(q) * sin[:, None]


def test_mrope_matches_transformers():
    from transformers import Qwen2VLTextConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding
    cfg = Qwen2VLTextConfig(hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                             "mrope_section": [4, 6, 6]})
    ref = Qwen2VLRotaryEmbedding(cfg)
    ours = MRotaryEmbedding(32, 256, {"rope_type": "default", "rope_theta": 10000.0}, [4, 6, 6])
    torch.manual_seed(1)
    pos = torch.stack([torch.arange(10), torch.randint(0, 50, (10,)), torch.randint(0, 50, (10,))])
    cos, sin = ref(torch.zeros(1, 10, 32), pos[:, None, :])
    q, k = torch.randn(10, 4, 32), torch.randn(10, 2, 32)
    set_attention_metadata(AttentionMetadata(None, None, None, None, 0, 0))
    try:
        oq, ok = ours(pos, q.clone(), k.clone())
        assert torch.allclose(oq, _hf_rotate(q, cos[0], sin[0]), atol=1e-5)
        assert torch.allclose(ok, _hf_rotate(k, cos[0], sin[0]), atol=1e-5)
        # three equal positions are plain rotary
        set_attention_metadata(AttentionMetadata(None, None, None, None, 0, 0))
        plain = RotaryEmbedding(32, 256, {"rope_type": "default", "rope_theta": 10000.0})
        flat = pos[0]
        a = ours(torch.stack([flat] * 3), q.clone(), k.clone())[0]
        set_attention_metadata(AttentionMetadata(None, None, None, None, 0, 0))
        b = plain(flat, q.clone(), k.clone())[0]
        assert torch.allclose(a, b, atol=1e-6)
    finally:
        set_attention_metadata(None)
    with pytest.raises(ValueError, match="mrope_section"):
        MRotaryEmbedding(32, 16, {"rope_type": "default", "rope_theta": 1.0}, [4, 4, 4])


def test_vision_rotary_matches_transformers():
    from transformers import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import (Qwen2VLVisionRotaryEmbedding,
                                                                apply_rotary_pos_emb_vision)
    vc = Qwen2VLVisionConfig(embed_dim=64, num_heads=4)
    ref = Qwen2VLVisionRotaryEmbedding(vc)
    ours = VisionRotaryEmbedding(16)
    hw = torch.stack([torch.arange(12) // 4, torch.arange(12) % 4], dim=-1)
    cos, sin = ref(torch.zeros(1), hw)
    q, k = torch.randn(12, 4, 16), torch.randn(12, 4, 16)
    rq, rk = apply_rotary_pos_emb_vision(q, k, cos, sin)
    oq, ok = ours(ours.table(hw), q.clone(), k.clone())
    assert torch.allclose(oq, rq, atol=1e-5) and torch.allclose(ok, rk, atol=1e-5)


# --------------------------------------------------------------------------- encoder cache

def _req(rid, feats):
    return types.SimpleNamespace(request_id=rid, encoder_refs=set(), num_computed_tokens=0,
                                 mm_features=[types.SimpleNamespace(identifier=h, offset=o, length=n, num_embeds=n)
                                              for h, o, n in feats])


def test_encoder_cache_plan_commit_release_evict():
    cache = EncoderCacheManager(capacity=20, max_images_per_step=2)
    a = _req("a", [("x", 2, 8), ("y", 12, 8), ("z", 30, 8)])
    step = cache.new_step()
    # tokens 0..40 cover three images; two fit the step (images and rows): stop before z
    n, hits, new = cache.plan(a, 0, 40, step)
    assert (n, hits, new) == (30, [], [0, 1])
    cache.commit(a, hits, new, step)
    b = _req("b", [("x", 0, 8), ("w", 10, 8)])
    n, hits, new = cache.plan(b, 0, 20, step)  # x is encoded this step; w would be a third image
    assert (n, hits, new) == (10, [0], [])
    cache.commit(b, hits, new, step)
    assert cache.queries == 3 and cache.hits == 1 and cache.encoded == 2
    # a passes x: still used by b; b passes x: unreferenced, kept for reuse
    a.num_computed_tokens = 11
    cache.release_passed(a)
    assert "x" in cache.size and not cache.unused
    cache.release_all(b)
    assert list(cache.unused) == ["x"]
    # z (8 rows) needs room: 16 used of 20, x is evicted and the worker told
    step = cache.new_step()
    a.num_computed_tokens = 30
    n, hits, new = cache.plan(a, 30, 10, step)
    assert (n, new) == (10, [2])
    cache.commit(a, hits, new, step)
    assert cache.take_freed() == ["x"] and set(cache.size) == {"y", "z"}
    # an image bigger than the whole cache runs alone once nothing is referenced
    big = _req("c", [("huge", 0, 50)])
    assert cache.plan(big, 0, 60, cache.new_step())[0] == 0
    cache.release_all(a)
    n, _, new = cache.plan(big, 0, 60, cache.new_step())
    assert (n, new) == (60, [0])
