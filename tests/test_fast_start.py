"""Start-up without the slow paths: the GGUF header read once by our own reader (the vocabulary
left in the file), Q4/Q8 blocks taken straight as int8 groups, C kernels built in the background.
Each is checked against the slow path it replaces: gguf.GGUFReader, gguf's dequantize,
transformers' GGUF loading. Start-up times are measured in benchmarks/startup.py, not here."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import gguf
from gguf.constants import GGMLQuantizationType as T
from pagoda.kernels import cpu_build, cpu_int8
from pagoda.worker import gguf_blocks, gguf_reader, kv_cache, loader


@pytest.fixture(scope="module")
def bundled_path() -> str:
    return loader.bundled_model_path()


def test_header_matches_gguf_reader(bundled_path):
    ref = gguf.GGUFReader(bundled_path)
    h = gguf_reader.read_header(bundled_path)
    assert h.architecture == "llama" and h.quant_types == {"Q4_1", "Q8_0"}
    assert [t.name for t in h.tensors] == [t.name for t in ref.tensors]
    for ours, theirs in zip(h.tensors, ref.tensors):
        assert (ours.type, ours.offset, ours.nbytes) == (theirs.tensor_type, theirs.data_offset, theirs.n_bytes)
        assert ours.shape == tuple(reversed(theirs.shape.tolist()))
        assert np.array_equal(h.tensor_bytes(ours).reshape(-1), theirs.data.reshape(-1).view(np.uint8))
    fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert set(h.metadata) == set(fields)
    skipped = [k for k, v in h.metadata.items() if isinstance(v, gguf_reader.StringArray)]
    assert "tokenizer.ggml.tokens" in skipped and "tokenizer.ggml.merges" in skipped
    for k, f in fields.items():
        got = h.strings(k) if k in skipped else h.metadata[k]
        assert got == f.contents(), k


def test_header_refuses_other_files_clearly(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGML" + bytes(100))
    with pytest.raises(ValueError, match="not a GGUF file"):
        gguf_reader.read_header(str(bad))
    with pytest.raises(ValueError, match="not a GGUF file"):
        loader.resolve_model(str(bad))


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q8_0])
def test_block_groups_hold_gguf_blocks_exactly(qtype):
    rng = np.random.default_rng(int(qtype))
    w = (rng.standard_normal((48, 160)) * rng.uniform(0.01, 2.0, (48, 1))).astype(np.float32)
    raw = gguf.quants.quantize(w, qtype)
    ref = torch.from_numpy(gguf.quants.dequantize(raw, qtype).astype(np.float32))
    g = gguf_blocks.block_groups(raw, qtype, w.shape)
    assert g[0].dtype == torch.uint8 and g[0].shape == w.shape and g[1].shape == (48, 5)
    assert torch.equal(gguf_blocks.groups_to_float(g), ref)
    assert torch.equal(cpu_int8.dequantize_weight(*g), ref)  # the int8 format's own reference
    if cpu_int8.available():
        x = torch.randn(3, 160)
        torch.testing.assert_close(cpu_int8.int8_matmul(x, *g), x @ ref.T, rtol=1e-5, atol=1e-4)


def _count_parses(monkeypatch) -> dict:
    counts = {"GGUFReader": 0, "read_header": 0}
    init, read = gguf.gguf_reader.GGUFReader.__init__, gguf_reader.read_header

    def counting_init(self, *a, **kw):
        counts["GGUFReader"] += 1
        init(self, *a, **kw)

    def counting_read(*a, **kw):
        counts["read_header"] += 1
        return read(*a, **kw)
    monkeypatch.setattr(gguf.gguf_reader.GGUFReader, "__init__", counting_init)
    monkeypatch.setattr(gguf_reader, "read_header", counting_read)
    return counts


def test_engine_start_parses_the_gguf_once(monkeypatch, smollm_side_dir):
    """With the converted tokenizer/config cached (the session converted it), one engine start
    reads the GGUF header once and never builds gguf.GGUFReader."""
    from pagoda import LLM
    counts = _count_parses(monkeypatch)
    llm = LLM(max_model_len=256, num_gpu_blocks_override=32)
    assert counts == {"GGUFReader": 0, "read_header": 1}
    w = llm.llm_engine.core.worker
    assert w.quantization == "gguf" and w.source.gguf_header is not None


def test_cold_start_converts_from_the_one_header_read(monkeypatch, tmp_path, bundled_path):
    """A fresh cache: the tokenizer/config conversion works from the header pagoda reads (kept on
    the ModelSource for the engine), never from gguf.GGUFReader; the next start finds it cached."""
    monkeypatch.setenv("PAGODA_CACHE_DIR", str(tmp_path))
    counts = _count_parses(monkeypatch)
    src = loader.resolve_model(None)
    assert src.config_dir.startswith(str(tmp_path)) and os.path.exists(os.path.join(src.config_dir, "tokenizer.json"))
    assert counts == {"GGUFReader": 0, "read_header": 1} and src.gguf_header is not None
    assert loader.gguf_tensor_count(src) == 272 and loader.gguf_quant_types(src) == {"Q4_1", "Q8_0"}
    assert counts["read_header"] == 1
    again = loader.resolve_model(None)
    assert again.config_dir == src.config_dir and again.gguf_header is None  # cached: read when needed
    assert counts == {"GGUFReader": 0, "read_header": 1}


def _tiny_gguf(folder, arch: str, tied: bool, bundled: gguf_reader.GGUFHeader) -> str:
    """A GGUF of `arch` with tiny hyperparameters and the bundled model's vocabulary, alone in its
    folder (as a downloaded GGUF is)."""
    os.makedirs(folder)
    path = os.path.join(folder, f"tiny-{arch}.gguf")
    m = bundled.metadata
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"tiny {arch}")
    w.add_context_length(512)
    w.add_embedding_length(64)
    w.add_block_count(2)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(50000.0)
    if arch == "qwen3":
        w.add_key_length(32)
        w.add_value_length(32)
    w.add_tokenizer_model(m["tokenizer.ggml.model"])
    w.add_tokenizer_pre(m["tokenizer.ggml.pre"])
    w.add_token_list(bundled.strings("tokenizer.ggml.tokens"))
    w.add_token_merges(bundled.strings("tokenizer.ggml.merges"))
    w.add_token_types(m["tokenizer.ggml.token_type"])
    w.add_bos_token_id(m["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(m["tokenizer.ggml.eos_token_id"])
    w.add_pad_token_id(m["tokenizer.ggml.padding_token_id"])
    w.add_add_bos_token(arch == "qwen2")
    w.add_chat_template(m["tokenizer.chat_template"])
    w.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    if not tied:
        w.add_tensor("output.weight", np.zeros((32, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _same_tokenizer(tok, ref):
    assert type(tok) is type(ref) and len(tok) == len(ref)
    assert tok.all_special_tokens == ref.all_special_tokens and tok.chat_template == ref.chat_template
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (ref.bos_token_id, ref.eos_token_id,
                                                                       ref.pad_token_id)
    for text in ["Hello world", "  leading spaces and ünïcödé ✓", "def f(x):\n\treturn x**2  # 数学",
                 "<|im_start|>user\nHi<|im_end|>"]:
        assert tok(text).input_ids == ref(text).input_ids, text
        assert tok.decode(tok(text).input_ids) == ref.decode(ref(text).input_ids)


@pytest.mark.parametrize("arch,tied", [("llama", False), ("qwen2", False), ("qwen3", True)])
def test_conversion_equals_transformers_gguf_loading(tmp_path, bundled_path, arch, tied):
    """gguf_convert (our header, transformers' tables) gives what AutoConfig/AutoTokenizer give
    from the same file through their own full GGUF parse."""
    from transformers import AutoConfig, AutoTokenizer
    from pagoda.worker import gguf_convert
    path = _tiny_gguf(str(tmp_path / arch), arch, tied, gguf_reader.read_header(bundled_path))
    h = gguf_reader.read_header(path)
    assert gguf_convert.config_dict(h) is not None  # the fast path, not the fallback
    cfg = gguf_convert.load_config(h)
    d, f = os.path.split(path)
    ref = AutoConfig.from_pretrained(d, gguf_file=f)
    assert type(cfg) is type(ref) and cfg.tie_word_embeddings == tied
    ours, theirs = cfg.to_dict(), ref.to_dict()
    for k in ("_name_or_path", "transformers_version"):
        ours.pop(k, None), theirs.pop(k, None)
    assert ours == theirs
    _same_tokenizer(gguf_convert.load_tokenizer(h, cfg), AutoTokenizer.from_pretrained(d, gguf_file=f))


def test_cached_config_and_tokenizer_equal_transformers_gguf_loading(bundled_path):
    from transformers import AutoConfig, AutoTokenizer
    src = loader.resolve_model(None)
    d, f = os.path.split(bundled_path)
    ours, theirs = loader.load_config(src).to_dict(), AutoConfig.from_pretrained(d, gguf_file=f).to_dict()
    for k in ("_name_or_path", "transformers_version"):
        ours.pop(k, None), theirs.pop(k, None)
    assert ours == theirs
    tok, ref = loader.load_tokenizer(src), AutoTokenizer.from_pretrained(d, gguf_file=f)
    # load_tokenizer reads the cached tokenizer.json with the generic fast class
    assert type(tok).__name__ in ("PreTrainedTokenizerFast", "TokenizersBackend")
    _same_tokenizer(tok, ref)


def _hf_gguf_state(bundled_path) -> dict:
    from transformers import AutoModelForCausalLM
    d, f = os.path.split(bundled_path)
    hf = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    return {k.removeprefix("model."): v for k, v in hf.state_dict().items()}


def _expected(model, state: dict, mname: str, mod) -> torch.Tensor:
    """transformers' weight for one of our modules (merged shards concatenated in order)."""
    parent, _, leaf = mname.rpartition(".")
    frags = [f for f, (merged, _) in sorted(model.packed.items(), key=lambda kv: kv[1][1]) if merged == leaf]
    if not frags:
        return state["embed_tokens.weight" if mname == "lm_head" and mod.tied else f"{mname}.weight"]
    return torch.cat([state[f"{parent}.{f}.weight"] for f in frags])


def test_weights_equal_transformers_gguf_loading_float_packed_and_int8(bundled_path, bundled_llm):
    """Float (--quantization none): every parameter is transformers' dequantized GGUF weight.
    gguf (the default on the CPU): every matmul keeps the file's blocks, whose dequantization is
    exactly those weights; int8: every matmul's groups hold exactly those weights."""
    from pagoda import LLM
    from pagoda.kernels import cpu_gguf
    from pagoda.layers.embedding import LMHead
    from pagoda.layers.linear import Linear
    state = _hf_gguf_state(bundled_path)
    fl = LLM(max_model_len=256, num_gpu_blocks_override=32, quantization="none").llm_engine.core.worker.model
    for mname, mod in fl.named_modules():
        if isinstance(mod, (Linear, LMHead)):
            assert torch.equal(mod.weight, _expected(fl, state, mname, mod)), mname
    for name, p in fl.named_parameters():
        if "proj" not in name and name != "lm_head.weight":
            assert torch.equal(p, state[name]), name
    del fl
    packed = bundled_llm.llm_engine.core.worker.model
    i8 = LLM(max_model_len=256, num_gpu_blocks_override=32, quantization="int8").llm_engine.core.worker.model
    for q, fmt in ((packed, "gguf"), (i8, "int8")):
        n = 0
        for mname, mod in q.named_modules():
            if isinstance(mod, (Linear, LMHead)):
                if fmt == "gguf":
                    parts = sorted(mod.gguf.parts, key=lambda p: p.col0)
                    w = torch.cat([cpu_gguf.dequantize_torch(p.data, p.type) for p in parts])
                else:
                    w = cpu_int8.dequantize_weight(mod.int8.qweight, mod.int8.scales, mod.int8.mins)
                assert torch.equal(w, _expected(q, state, mname, mod)), (fmt, mname)
                n += 1
        assert n == 30 * 4 + 1


def test_kernels_build_in_background_into_a_fresh_cache(monkeypatch, tmp_path):
    if cpu_build._build("cpu_int8") is None:
        pytest.skip("needs x86 AVX2 and a C compiler")
    monkeypatch.setenv("PAGODA_CACHE_DIR", str(tmp_path))
    for d in ("_loaded", "_building"):
        monkeypatch.setattr(cpu_build, d, {})
    monkeypatch.setattr(cpu_build, "_times", {"build": None, "waited": 0.0, "compiled": 0})
    cpu_build.build_in_background()
    sources = sorted(f[:-2] for f in os.listdir(os.path.dirname(cpu_build.__file__))
                     if f.startswith("cpu_") and f.endswith(".c"))
    assert sorted(name for name, _isa in cpu_build._building) == sources
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(40, 64, generator=g), torch.randn(3, 64, generator=g)
    q = cpu_int8.quantize_weight(w)
    torch.testing.assert_close(cpu_int8.int8_matmul(x, *q), cpu_int8.int8_matmul_torch(x, *q))
    for fut in cpu_build._building.values():
        assert fut.result(timeout=120) is not None
    built = sorted(f.split("-")[0] for f in os.listdir(tmp_path / "kernels") if f.endswith(".so"))
    assert built == sources and cpu_build.build_times()["compiled"] == len(sources)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kv_cache_is_zero_and_writable(dtype):
    from pagoda.layers.quantization.kv_cache import KVCacheFormat
    pairs = kv_cache.allocate_kv_cache(KVCacheFormat("auto", dtype, 2, 32), 2, 8, 16, "cpu")
    caches = [c for c, quant in pairs]
    assert len(caches) == 2 and caches[0].data_ptr() != caches[1].data_ptr()
    assert all(quant is None for _, quant in pairs)  # auto: the model's dtype, no scales
    for c in caches:
        assert c.shape == (2, 8, 16, 2, 32) and c.dtype == dtype and c.is_contiguous()
        assert not c.any()
        c[1, 3, 5].fill_(2.5)
        assert c.sum().item() == 2.5 * 64


def test_int8_groups_no_layer_takes_are_an_error():
    """iter_gguf yields zeros for the matrices it hands over as groups; a group no layer takes
    must stop the start rather than leave zeros in the model."""
    from transformers import LlamaConfig
    from conftest import TINY
    from pagoda.models.llama import LlamaForCausalLM
    if not cpu_int8.available():
        pytest.skip("needs the CPU int8 kernel")
    model = LlamaForCausalLM(LlamaConfig(**TINY, vocab_size=128, max_position_embeddings=64))
    g = cpu_int8.quantize_weight(torch.randn(128, 64))
    loader.quantize_int8(model, {"model.layers.0.mlp.down_proj.weight": cpu_int8.quantize_weight(torch.randn(64, 128)),
                                 "lm_head.weight": g})
    assert model.layers[0].mlp.down_proj.int8.qweight.shape == (64, 128)
    model = LlamaForCausalLM(LlamaConfig(**TINY, vocab_size=128, max_position_embeddings=64))
    with pytest.raises(RuntimeError, match="no layer took them"):
        loader.quantize_int8(model, {"model.layers.0.mlp.extra_proj.weight": g})


@pytest.mark.parametrize("arch,tied", [("llama", False), ("qwen2", False), ("qwen3", True)])
def test_cached_config_reads_back_as_its_model_class(monkeypatch, tmp_path, bundled_path, arch, tied):
    """A converted config is read back without its transformers model class (whose import costs a
    warm start ~0.7 s): every field, and every attribute the class gives, are the class's own
    reading of the same file (but the class's tensor/pipeline-parallel plans, transformers'
    own model parallelism)."""
    from transformers import AutoConfig
    from pagoda.worker import gguf_convert
    monkeypatch.setenv("PAGODA_CACHE_DIR", str(tmp_path / "cache"))
    path = _tiny_gguf(str(tmp_path / arch), arch, tied, gguf_reader.read_header(bundled_path))
    src = loader.resolve_model(path)
    cfg = loader.load_config(src)
    ref = AutoConfig.from_pretrained(src.config_dir)
    assert type(cfg).__module__ == gguf_convert.__name__ and cfg.model_type == ref.model_type == arch
    assert cfg.to_dict() == ref.to_dict()
    skip = {"base_model_tp_plan", "base_model_pp_plan", "per_layer_config"}
    for name in dir(ref):
        if name.startswith("__") or name in skip or callable(getattr(ref, name)):
            continue
        assert getattr(cfg, name) == getattr(ref, name), name
    assert cfg.get_text_config() is cfg
    import pickle
    assert pickle.loads(pickle.dumps(cfg)).to_dict() == cfg.to_dict()  # the class is found by name


def test_other_model_types_read_back_through_autoconfig(tmp_path):
    from transformers import Gemma3TextConfig
    from pagoda.worker import gguf_convert
    Gemma3TextConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     num_hidden_layers=2, intermediate_size=128).save_pretrained(tmp_path)
    assert gguf_convert.read_config(str(tmp_path)) is None


def test_cached_tokenizer_loads_without_parsing_tokenizer_json_in_python(monkeypatch, smollm_side_dir):
    """The conversion lists the added tokens in tokenizer_config.json, so loading the tokenizer
    leaves tokenizer.json to the tokenizers library (transformers otherwise json-parses all
    3.5 MB of it to find them); the tokens listed are the tokenizer's own."""
    import builtins
    import json
    with open(os.path.join(smollm_side_dir, "tokenizer_config.json")) as f:
        listed = json.load(f)["added_tokens_decoder"]
    opened = []
    real_open = builtins.open

    def recording_open(file, *a, **kw):
        opened.append(os.path.basename(str(file)))
        return real_open(file, *a, **kw)
    monkeypatch.setattr(builtins, "open", recording_open)
    tok = loader.load_tokenizer(loader.ModelSource("x", smollm_side_dir, smollm_side_dir, gguf_file="x.gguf"))
    monkeypatch.undo()
    assert "tokenizer_config.json" in opened and "tokenizer.json" not in opened
    assert {int(i): t["content"] for i, t in listed.items()} == \
        {i: t.content for i, t in tok.added_tokens_decoder.items()}
    assert all(t["special"] == tok.added_tokens_decoder[int(i)].special for i, t in listed.items())


def test_held_weights_are_not_copied_into_float_weights():
    """What the loader keeps packed reaches a layer as a held_weight, which it does not copy
    (the float weight is replaced after loading); anything else, a broadcast zero of one's own
    included, is copied."""
    from pagoda.layers.embedding import LMHead
    from pagoda.layers.linear import Linear, held_weight, is_held
    lin = Linear(8, 6, shard_sizes=[4, 2])
    lin.weight.data.fill_(7.0)
    lin.load_shard(0, "weight", held_weight((4, 8)))
    assert is_held(held_weight((4, 8))) and torch.all(lin.weight == 7.0)
    own_zero = torch.zeros(()).expand(2, 8)
    assert not is_held(own_zero) and not is_held(torch.zeros(2, 8))
    lin.load_shard(1, "weight", own_zero)
    assert torch.all(lin.weight[:4] == 7.0) and torch.all(lin.weight[4:] == 0.0)
    head = LMHead(10, 8)
    head.weight.data.fill_(3.0)
    head.load_full("weight", held_weight((10, 8)))
    assert torch.all(head.weight == 3.0)
    head.load_full("weight", torch.ones(10, 8))
    assert torch.all(head.weight == 1.0)


_WARM_START = r"""
import gc, json, sys
from pagoda import LLM
try:
    LLM(model="/nonexistent/model.gguf")
except ValueError:
    pass
failed = {"enabled": gc.isenabled(), "frozen": gc.get_freeze_count()}
import weakref
llm = LLM(max_model_len=256, num_gpu_blocks_override=32)
first = {"enabled": gc.isenabled(), "frozen": gc.get_freeze_count()}
engine = weakref.ref(llm.llm_engine)
del llm
gc.collect()
first["freed"] = engine() is None
LLM(max_model_len=256, num_gpu_blocks_override=32)
second = {"enabled": gc.isenabled(), "frozen": gc.get_freeze_count(), "freed": True}
heavy = ["transformers.activations", "torch.distributed.tensor", "triton", "fastapi", "uvicorn",
         "xgrammar", "openai", "pagoda.entrypoints.openai.protocol", "pagoda.models.whisper"]
print(json.dumps({"loaded": [m for m in heavy if m in sys.modules], "failed": failed, "first": first,
                  "second": second}))
"""


def test_warm_start_imports_only_what_the_offline_path_needs(smollm_side_dir):
    """A warm LLM() on the CPU (the bundled model's config and tokenizer converted by the session)
    imports no transformers model class (torch.distributed.tensor with it), no triton, no server
    or grammar modules; the collector is paused only through the first start that succeeds, is
    on after every start, and a deleted LLM is collected."""
    import json
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", _WARM_START], cwd=root, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["loaded"] == []
    assert out["failed"] == {"enabled": True, "frozen": 0}
    # nothing frozen: a deleted engine (its KV cache with it) goes with the next collection
    assert out["first"] == {"enabled": True, "frozen": 0, "freed": True}
    assert out["second"] == out["first"]
