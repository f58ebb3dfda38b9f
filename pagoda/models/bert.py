"""BERT encoder (HF ``BertModel`` checkpoints: sentence-transformers' MiniLM, BGE, E5, ...) and
the cross-encoder ``BertForSequenceClassification`` (ms-marco MiniLM rerankers, ...).

Embedding models read every token of an input at once with bidirectional attention, so unlike
the decoders there is no KV cache and no causal mask. The engine runs them like any model: one
flattened batch of variable-length inputs per step, through pagoda's encoder attention layer
(each token sees its own input's tokens only); ``pagoda/layers/pooler.py`` reduces the last
hidden states to one vector per input.

Layout per layer (post-LayerNorm, as in the original BERT):
    x = LN(x + Out(Attention(QKV(x))));  x = LN(x + Down(act(Up(x))))
q, k and v are one fused projection (one matmul instead of three); its rows are loaded from
the checkpoint's separate query/key/value tensors.

A classifier reads the first token ([CLS]) through `ClassificationHead` (dense -> tanh -> out):
BERT names it `bert.pooler.dense` + `classifier`, RoBERTa `classifier.dense` + `classifier.out_proj`.
A text pair is one input whose second segment has token type 1.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.layers.attention import EncoderAttention

_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}

# checkpoint names (after the layer prefix) -> ours; q/k/v go to rows of the fused projection
_LAYER_NAMES = {
    "attention.output.dense": "out",
    "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "up",
    "output.dense": "down",
    "output.LayerNorm": "mlp_norm",
}
_QKV = {"attention.self.query": 0, "attention.self.key": 1, "attention.self.value": 2}
_EMBEDDING_NAMES = {
    "embeddings.word_embeddings": "embeddings.word",
    "embeddings.position_embeddings": "embeddings.position",
    "embeddings.token_type_embeddings": "embeddings.token_type",
    "embeddings.LayerNorm": "embeddings.norm",
}
# in checkpoints but not part of the encoder: the NSP pooler, the MLM / NSP heads, buffers
_UNUSED_PREFIXES = ("pooler.", "cls.", "embeddings.position_ids", "embeddings.token_type_ids", "lm_head.")


class BertEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        h = config.hidden_size
        self.word = nn.Embedding(config.vocab_size, h)
        self.position = nn.Embedding(config.max_position_embeddings, h)
        self.token_type = nn.Embedding(max(int(getattr(config, "type_vocab_size", 1) or 1), 1), h)
        self.norm = nn.LayerNorm(h, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                token_type_ids: torch.Tensor | None) -> torch.Tensor:
        if token_type_ids is None:  # one segment: every token is type 0
            x = self.word(input_ids) + self.token_type.weight[0]
        else:
            x = self.word(input_ids) + self.token_type(token_type_ids)
        return self.norm(x + self.position(positions))


class BertLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        h = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = h // self.num_heads
        self.qkv = nn.Linear(h, 3 * h)
        self.out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.up = nn.Linear(h, config.intermediate_size)
        self.down = nn.Linear(config.intermediate_size, h)
        self.mlp_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.act = _ACTIVATIONS[config.hidden_act]
        self.attn = EncoderAttention(self.num_heads, self.head_dim, 1.0 / math.sqrt(self.head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, h = x.shape
        q, k, v = self.qkv(x).view(t, 3, self.num_heads, self.head_dim).unbind(1)
        a = self.attn(q, k, v)
        x = self.attn_norm(x + self.out(a.reshape(t, h)))
        return self.mlp_norm(x + self.down(self.act(self.up(x))))


class ClassificationHead(nn.Module):
    """[CLS] hidden state -> class logits: out(tanh(dense(x))) (dropout is off at inference)."""

    def __init__(self, hidden_size: int, num_labels: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.out = nn.Linear(hidden_size, num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.dense(x)))


class BertModel(nn.Module):
    """forward(input_ids [T], positions [T]) -> last hidden states [T, H] of a flattened batch
    (the sequences' bounds come from the step's attention metadata)."""
    is_encoder_only = True  # no KV cache: each input is read whole in one step
    prefix = "bert."        # where BertFor* checkpoints keep the encoder
    # checkpoint module -> ours, for heads on top of the encoder (classifiers)
    head_names: dict[str, str] = {}

    def __init__(self, config):
        super().__init__()
        if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
            raise ValueError(f"--model: BERT position_embedding_type "
                             f"{config.position_embedding_type!r} is not supported (absolute only)")
        if config.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"--model: BERT hidden_act {config.hidden_act!r} is not supported; "
                             f"supported: {', '.join(_ACTIVATIONS)}")
        self.config = config
        self.hidden_size = config.hidden_size
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embeddings(input_ids, positions, token_type_ids)
        for layer in self.layers:
            x = layer(x)
        return x

    def attention_layers(self) -> list:
        return []  # nothing reads a KV cache

    # -- weights ---------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load HF-named tensors (BertModel names, or BertFor*'s under ``bert.``); returns the
        names of our parameters filled (``layers.N.qkv.weight#0`` for one q/k/v slice)."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        h = self.hidden_size
        for name, tensor in weights:
            name = name.removeprefix(self.prefix)
            name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta",
                                                                               "LayerNorm.bias")
            module, _, pname = name.rpartition(".")
            if module in self.head_names:
                target, shard = f"{self.head_names[module]}.{pname}", None
            elif name.startswith(_UNUSED_PREFIXES):
                continue
            elif module in _EMBEDDING_NAMES:
                target, shard = f"{_EMBEDDING_NAMES[module]}.{pname}", None
            elif module.startswith("encoder.layer."):
                idx, _, part = module.removeprefix("encoder.layer.").partition(".")
                if part in _QKV:
                    target, shard = f"layers.{idx}.qkv.{pname}", _QKV[part]
                elif part in _LAYER_NAMES:
                    target, shard = f"layers.{idx}.{_LAYER_NAMES[part]}.{pname}", None
                else:
                    target = None
            else:
                target = None
            if target is None or target not in params:
                raise ValueError(f"--model: unexpected {type(self).__name__} checkpoint tensor {name!r}")
            dest = params[target].data
            if shard is not None:
                dest = dest[shard * h:(shard + 1) * h]
            if dest.shape != tensor.shape:
                raise ValueError(f"--model: checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(dest.shape)}")
            dest.copy_(tensor)
            loaded.add(target if shard is None else f"{target}#{shard}")
        return loaded

    def expected_weights(self) -> set[str]:
        names = set()
        for n, _ in self.named_parameters():
            names |= {f"{n}#{i}" for i in range(3)} if ".qkv." in n else {n}
        return names


class SequenceClassifier:
    """Mixin over an encoder class: `classify` on the pooled [CLS] state through `head`."""

    def __init__(self, config):
        super().__init__(config)
        self.head = ClassificationHead(config.hidden_size, config.num_labels)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.head(pooled)


class BertForSequenceClassification(SequenceClassifier, BertModel):
    """A cross-encoder / classifier: the encoder, then the NSP-style pooler and the classifier."""
    head_names = {"pooler.dense": "head.dense", "classifier": "head.out"}
