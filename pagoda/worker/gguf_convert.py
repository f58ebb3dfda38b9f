"""A GGUF's config and tokenizer as transformers objects, converted once per file (loader caches
the result), without the two full gguf.GGUFReader parses transformers' own path costs.

`AutoConfig.from_pretrained(dir, gguf_file=...)` and `AutoTokenizer.from_pretrained(dir,
gguf_file=...)` each build the config through `load_gguf_checkpoint`, i.e. a GGUFReader over the
whole file: ~2 s apiece on this 2-core machine (~5-10 s when it is busy), mostly the vocabulary.
Here the config dict is rebuilt from our header (gguf_reader) with transformers' own tables
(GGUF_TO_TRANSFORMERS_MAPPING, GGUF_CONFIG_DEFAULTS_MAPPING) the way load_gguf_checkpoint uses
them, and the tokenizer class is the one AutoTokenizer picks for that config when the file's
folder holds nothing else; the tokenizer itself is still converted by transformers from the
vocabulary (read once, by its light reader). Architectures whose config load_gguf_checkpoint
special-cases, folders with their own tokenizer/config files, and older transformers without
these pieces go through transformers' full path, unchanged. tests/test_fast_start.py checks both
against transformers for llama, qwen2 and qwen3 files.

Reading the cached files back (every start after the first) avoids two slow paths of transformers
5: a model's config class (LlamaConfig, Qwen3Config, ...) imports torch.distributed.tensor through
transformers' model-loading modules, about a quarter of a warm `LLM()` on the 2-core machine, so
the flat configs of READ_BACK_TYPES come back as a PreTrainedConfig of their model_type with the
saved fields (read_config); and a tokenizers-backed tokenizer saved by transformers leaves its
added tokens out of tokenizer_config.json, which makes from_pretrained parse the whole
tokenizer.json in Python to find them, so save() writes them there.
"""
from __future__ import annotations

import functools
import json
import os

from pagoda.worker.gguf_reader import GGUFHeader, StringArray

# architectures pagoda loads from GGUF whose config load_gguf_checkpoint builds from its tables
# alone (others have extra rules there: gemma3/4 text configs, lfm2, gpt-oss, t5, stablelm, ...)
TABLE_ARCHS = frozenset({"llama", "qwen2", "qwen3"})
_FOLDER_FILES = ("tokenizer_config.json", "tokenizer.json", "config.json")


def config_dict(header: GGUFHeader) -> dict | None:
    """The dict transformers' load_gguf_checkpoint builds for this file's config, or None when
    the architecture is not one it builds from its tables alone."""
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_TO_TRANSFORMERS_MAPPING
        from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING
    except ImportError:
        return None
    meta = header.metadata
    arch = header.architecture
    name = meta.get("general.name")
    # llama.cpp names Mistral's architecture "llama"; transformers tells them apart by the name
    # (`"mistral" in model_name`, where model_name is a one-item list)
    updated = "mistral" if "llama" in arch and name == "mistral" else arch
    if arch not in TABLE_ARCHS or updated not in GGUF_TO_TRANSFORMERS_MAPPING["config"]:
        return None
    out: dict = {"tie_word_embeddings": all(t.name != "output.weight" for t in header.tensors)}
    for k, v in (GGUF_CONFIG_DEFAULTS_MAPPING.get(updated) or GGUF_CONFIG_DEFAULTS_MAPPING.get(arch) or {}).items():
        out.setdefault(k, v)
    renames = GGUF_TO_TRANSFORMERS_MAPPING["config"]
    for key, value in meta.items():
        key = key.replace(arch, updated)
        prefix, _, sub = key.partition(".")
        target = renames.get(prefix, {}).get(sub, -1)
        if target == -1 or target is None:
            continue
        if isinstance(value, StringArray):
            return None  # a config value we did not decode: let transformers do it all
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if isinstance(value, str) and arch in value:
            value = value.replace(arch, updated)
        out[target] = value
    if "vocab_size" not in out:
        tokens = meta.get("tokenizer.ggml.tokens")
        if isinstance(tokens, StringArray):
            out["vocab_size"] = tokens.count
    return out


def load_config(header: GGUFHeader):
    """The file's transformers config (what AutoConfig.from_pretrained(gguf_file=) gives)."""
    d = config_dict(header)
    if d is None:
        from transformers import AutoConfig
        folder, f = os.path.split(header.path)
        return AutoConfig.from_pretrained(folder, gguf_file=f)
    from transformers import CONFIG_MAPPING
    return CONFIG_MAPPING[d["model_type"]].from_dict(d)


def load_tokenizer(header: GGUFHeader, config):
    """The file's tokenizer (what AutoTokenizer.from_pretrained(gguf_file=) gives)."""
    from transformers import AutoTokenizer
    folder, f = os.path.split(header.path)
    cls = None
    if not getattr(config, "tokenizer_class", None) and \
            not any(os.path.exists(os.path.join(folder, n)) for n in _FOLDER_FILES):
        try:  # AutoTokenizer's choice for a config with no tokenizer files beside it
            from transformers import TokenizersBackend
            from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING
            cls = TOKENIZER_MAPPING.get(type(config), TokenizersBackend)
        except ImportError:
            cls = None
        if cls is not None and cls.__name__ == "MistralCommonBackend":
            cls = None
    if cls is None:
        return AutoTokenizer.from_pretrained(folder, gguf_file=f)
    return cls.from_pretrained(folder, gguf_file=f)


def save(config, tokenizer, folder: str) -> None:
    """The converted config and tokenizer as an HF folder, with the tokenizer's added tokens in
    tokenizer_config.json (the entry transformers' own save leaves out for tokenizers-backed
    tokenizers and reads back from tokenizer.json, in Python, at every load)."""
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    path = os.path.join(folder, "tokenizer_config.json")
    with open(path) as f:
        tc = json.load(f)
    tc.setdefault("added_tokens_decoder",
                  {str(i): t.__getstate__() for i, t in tokenizer.added_tokens_decoder.items()})
    with open(path, "w") as f:
        json.dump(tc, f, indent=2, ensure_ascii=False)


# model types whose saved config is flat (no sub-configs, no computed properties the engine
# reads): read back without their transformers class. tests/test_fast_start.py compares every
# attribute with the class's own reading of the same file.
READ_BACK_TYPES = frozenset({"llama", "qwen2", "qwen3"})


_CLASS_PREFIX = "GGUFConfig_"


@functools.cache
def _config_class(model_type: str):
    try:
        from transformers.configuration_utils import PreTrainedConfig
    except ImportError:  # transformers 4
        from transformers.configuration_utils import PretrainedConfig as PreTrainedConfig
    return type(_CLASS_PREFIX + model_type, (PreTrainedConfig,), {
        "model_type": model_type, "__module__": __name__,
        "__doc__": f"A converted GGUF's {model_type} config, read back without its model class."})


def __getattr__(name: str):
    """The read-back config classes by name, made on first use (so pickle finds them)."""
    if name.startswith(_CLASS_PREFIX) and name[len(_CLASS_PREFIX):] in READ_BACK_TYPES:
        return _config_class(name[len(_CLASS_PREFIX):])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def read_config(folder: str):
    """The config a conversion saved in `folder`, or None when its model type is not one of
    READ_BACK_TYPES (AutoConfig reads those)."""
    with open(os.path.join(folder, "config.json")) as f:
        d = json.load(f)
    if d.get("model_type") not in READ_BACK_TYPES:
        return None
    cfg = _config_class(d["model_type"]).from_dict(d)
    for k, v in d.items():  # what the generic class drops as generation parameters (use_cache)
        if k not in ("model_type", "transformers_version") and not hasattr(cfg, k):
            setattr(cfg, k, v)
    cfg.name_or_path = folder  # as from_pretrained sets it
    return cfg
