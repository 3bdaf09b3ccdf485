"""The BERT encoder (HF `BertModel`, e.g. all-MiniLM-L6-v2) as pure functions over a params pytree.

Text encoders here are frozen: never trained, no optimizer, no dropout, no state to update. So
they are plain functions of (params, ids, mask) rather than NNX modules: the params are a
nested dict of float32 arrays passed in as an argument, which is the simplest thing to `jit`
(the weights stay device buffers, not constants folded into the program). The architecture
numbers that shapes cannot tell (heads, eps) travel in `params["config"]`, a static pytree node
with no leaves, so `encode(params, ids, mask)` needs nothing else.

Layout: post-LayerNorm BERT, absolute position embeddings, token_type_ids all 0, exact (erf)
GELU, attention scaled by 1/sqrt(head_dim) with padding keys masked. Everything in float32.

Checkpoint keys are HF's (`embeddings.word_embeddings.weight`,
`encoder.layer.{i}.attention.self.query.weight`, ...; PyTorch Linear weights are [out, in] and
are transposed here for x @ W). Allowed but unused (`optional_shapes`): `embeddings.position_ids`
(a buffer of arange, not a weight) and `pooler.dense.*` (the [CLS] pooler, which the
sentence-transformers model does not use: it mean-pools the tokens).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "config.json") -> BertConfig:
        """From HF config.json's fields; unsupported variants are refused, naming the field."""
        checks = {
            "hidden_act": ("gelu",),
            "position_embedding_type": ("absolute",),
        }
        for field, allowed in checks.items():
            if d.get(field, allowed[0]) not in allowed:
                raise ValueError(
                    f"{source}: {field}={d[field]!r} is not supported (only {allowed})"
                )
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in d]
        if missing:
            raise ValueError(f"{source}: missing field(s) {', '.join(missing)} of a BERT config")
        cfg = cls(**{n: d[n] for n in names})
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(f"{source}: hidden_size is not a multiple of num_attention_heads")
        return cfg


def _cfg(config) -> BertConfig:
    return config if isinstance(config, BertConfig) else BertConfig.from_dict(config)


_LAYER = {  # our name -> (HF suffix under encoder.layer.{i}., is a Linear weight)
    "q_w": ("attention.self.query.weight", True),
    "q_b": ("attention.self.query.bias", False),
    "k_w": ("attention.self.key.weight", True),
    "k_b": ("attention.self.key.bias", False),
    "v_w": ("attention.self.value.weight", True),
    "v_b": ("attention.self.value.bias", False),
    "o_w": ("attention.output.dense.weight", True),
    "o_b": ("attention.output.dense.bias", False),
    "ln1_scale": ("attention.output.LayerNorm.weight", False),
    "ln1_bias": ("attention.output.LayerNorm.bias", False),
    "ff_in_w": ("intermediate.dense.weight", True),
    "ff_in_b": ("intermediate.dense.bias", False),
    "ff_out_w": ("output.dense.weight", True),
    "ff_out_b": ("output.dense.bias", False),
    "ln2_scale": ("output.LayerNorm.weight", False),
    "ln2_bias": ("output.LayerNorm.bias", False),
}
_EMBED = {
    "word": "embeddings.word_embeddings.weight",
    "position": "embeddings.position_embeddings.weight",
    "token_type": "embeddings.token_type_embeddings.weight",
    "ln_scale": "embeddings.LayerNorm.weight",
    "ln_bias": "embeddings.LayerNorm.bias",
}


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """{HF key: shape} of every weight the encoder uses."""
    c = _cfg(config)
    h, i = c.hidden_size, c.intermediate_size
    out = {
        _EMBED["word"]: (c.vocab_size, h),
        _EMBED["position"]: (c.max_position_embeddings, h),
        _EMBED["token_type"]: (c.type_vocab_size, h),
        _EMBED["ln_scale"]: (h,),
        _EMBED["ln_bias"]: (h,),
    }
    layer = {
        "q_w": (h, h), "k_w": (h, h), "v_w": (h, h), "o_w": (h, h),
        "ff_in_w": (i, h), "ff_in_b": (i,), "ff_out_w": (h, i),
    }  # fmt: skip
    for n in range(c.num_hidden_layers):
        for ours, (suffix, _) in _LAYER.items():
            out[f"encoder.layer.{n}.{suffix}"] = layer.get(ours, (h,))
    return out


def optional_shapes(config) -> dict[str, tuple[int, ...]]:
    """Keys a BertModel file may hold that the encoder does not use (see the module docstring)."""
    c = _cfg(config)
    h = c.hidden_size
    return {
        "embeddings.position_ids": (1, c.max_position_embeddings),
        "pooler.dense.weight": (h, h),
        "pooler.dense.bias": (h,),
    }


def params_from_state_dict(tensors: Mapping[str, np.ndarray], config) -> dict:
    """The params pytree from HF-named tensors (already checked with `expected_shapes`).

    Layers are stacked on a leading axis (scanned in `encode`: one layer compiled, not six).
    """
    c = _cfg(config)
    f32 = lambda k: np.asarray(tensors[k], np.float32)
    layers = {}
    for ours, (suffix, linear) in _LAYER.items():
        ws = [f32(f"encoder.layer.{n}.{suffix}") for n in range(c.num_hidden_layers)]
        layers[ours] = jnp.asarray(np.stack([w.T if linear else w for w in ws]))
    return {
        "config": c,
        "embeddings": {ours: jnp.asarray(f32(k)) for ours, k in _EMBED.items()},
        "layers": layers,
    }


def _layer_norm(x, scale, bias, eps):
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


def encode(params: dict, ids_NL: jax.Array, mask_NL: jax.Array) -> jax.Array:
    """Last hidden state [N, L, hidden] (BertModel's `last_hidden_state`) for token ids and a
    bool mask (True = token); padded positions attend nowhere and are returned as zeros."""
    c: BertConfig = params["config"]
    emb = params["embeddings"]
    n, length = ids_NL.shape
    if length > c.max_position_embeddings:
        raise ValueError(f"{length} tokens > max_position_embeddings={c.max_position_embeddings}")
    heads, dh = c.num_attention_heads, c.hidden_size // c.num_attention_heads
    mask_NL = mask_NL.astype(bool)
    x = emb["word"][ids_NL] + emb["position"][:length][None] + emb["token_type"][0]
    x = _layer_norm(x, emb["ln_scale"], emb["ln_bias"], c.layer_norm_eps)
    key_ok = mask_NL[:, None, None, :]  # [N, 1 head, 1 query, L key]

    def layer(x, p):
        split = lambda t: t.reshape(n, length, heads, dh)
        q = split(x @ p["q_w"] + p["q_b"])
        k = split(x @ p["k_w"] + p["k_b"])
        v = split(x @ p["v_w"] + p["v_b"])
        s = jnp.einsum("nqhd,nkhd->nhqk", q, k) / np.sqrt(dh).astype(np.float32)
        s = jnp.where(key_ok, s, jnp.finfo(jnp.float32).min)
        a = jnp.einsum("nhqk,nkhd->nqhd", jax.nn.softmax(s, axis=-1), v)
        a = a.reshape(n, length, heads * dh) @ p["o_w"] + p["o_b"]
        x = _layer_norm(x + a, p["ln1_scale"], p["ln1_bias"], c.layer_norm_eps)
        f = jax.nn.gelu(x @ p["ff_in_w"] + p["ff_in_b"], approximate=False)
        x = _layer_norm(
            x + f @ p["ff_out_w"] + p["ff_out_b"], p["ln2_scale"], p["ln2_bias"], c.layer_norm_eps
        )
        return x, None

    x, _ = jax.lax.scan(layer, x, params["layers"])
    return jnp.where(mask_NL[..., None], x, 0.0)


def mean_pool(hidden_NLD: jax.Array, mask_NL: jax.Array) -> jax.Array:
    """Mean over the real tokens (sentence-transformers' Pooling, pooling_mode_mean_tokens)."""
    m = mask_NL.astype(jnp.float32)[..., None]
    return (hidden_NLD * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)


def l2_normalize(x_ND: jax.Array, eps: float = 1e-12) -> jax.Array:
    """torch.nn.functional.normalize(x, p=2, dim=-1): sentence-transformers' Normalize module."""
    return x_ND / jnp.maximum(jnp.linalg.norm(x_ND, axis=-1, keepdims=True), eps)


def sentence_embedding(hidden_NLD: jax.Array, mask_NL: jax.Array) -> jax.Array:
    """all-MiniLM-L6-v2's sentence embedding: modules.json is Transformer -> Pooling (mean
    tokens, 1_Pooling/config.json) -> Normalize."""
    return l2_normalize(mean_pool(hidden_NLD, mask_NL))
