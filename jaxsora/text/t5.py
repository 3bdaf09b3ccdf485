"""The T5 encoder (HF `T5EncoderModel`; `UMT5EncoderModel` too) as pure functions over params.

Frozen, like bert.py: plain functions of (params, ids, mask), params a nested dict of float32
arrays passed in (simplest to `jit`), the architecture numbers in `params["config"]`, a static
pytree node with no leaves.

The facts that trip ports, each as in `transformers/models/t5/modeling_t5.py`:
- shared token embedding, not scaled; no absolute positions;
- relative position bias: bidirectional buckets (`relative_attention_num_buckets`,
  `relative_attention_max_distance`), the table only in block 0's SelfAttention and the same
  bias added in every layer (UMT5: a table in every layer);
- RMS norm (no mean, no bias, eps `layer_norm_epsilon`) in float32, pre-norm, and a final norm;
- attention scores NOT scaled by 1/sqrt(d_kv) (the scale is folded into the init); no biases;
- feed-forward `DenseReluDense`: ReLU `wi`, `wo` (`feed_forward_proj="relu"`, original T5) or
  gated `act(wi_0 x) * wi_1 x` then `wo`, tanh-GELU for "gated-gelu" (v1.1, flan, UMT5).

Checkpoint keys: `shared.weight` is the embedding, as `T5EncoderModel.save_pretrained` writes it;
a file holding only the tied alias `encoder.embed_tokens.weight` is read through it, and when
both are present the alias is allowed but unused. `decoder.*` and `lm_head.weight` of a full
`T5ForConditionalGeneration` file are allowed but never read (as HF's T5EncoderModel does), so
the released t5-v1_1 / flan-t5 files load as they are.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

EMBED_KEY = "shared.weight"
EMBED_ALIAS = "encoder.embed_tokens.weight"
UNUSED_PREFIXES = ("decoder.", "lm_head.")

_ACTS = {
    "relu": jax.nn.relu,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
}


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class T5Config:
    vocab_size: int
    d_model: int
    d_kv: int
    num_heads: int
    d_ff: int
    num_layers: int
    relative_attention_num_buckets: int
    relative_attention_max_distance: int
    layer_norm_epsilon: float
    act: str  # a key of _ACTS
    gated: bool
    bias_every_layer: bool  # UMT5

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "config.json") -> T5Config:
        """From HF config.json, deriving the activation as T5Config.__init__ does."""
        derived = ("act", "gated", "bias_every_layer")
        names = [f.name for f in dataclasses.fields(cls) if f.name not in derived]
        missing = [n for n in names if n not in d]
        if missing:
            raise ValueError(f"{source}: missing field(s) {', '.join(missing)} of a T5 config")
        proj = d.get("feed_forward_proj", "relu")
        parts = proj.split("-")
        gated = parts[0] == "gated"
        if len(parts) > 2 or (len(parts) == 2 and not gated):
            raise ValueError(f"{source}: feed_forward_proj={proj!r} is not 'ACT' or 'gated-ACT'")
        act = "gelu_new" if proj == "gated-gelu" else parts[-1]
        if act not in _ACTS:
            raise ValueError(
                f"{source}: feed_forward_proj={proj!r}: activation {act!r} is not one of "
                f"{sorted(_ACTS)}"
            )
        model_type = d.get("model_type", "t5")
        if model_type not in ("t5", "umt5"):
            raise ValueError(f"{source}: model_type={model_type!r} is not t5 or umt5")
        return cls(
            **{n: d[n] for n in names}, act=act, gated=gated, bias_every_layer=model_type == "umt5"
        )


def _cfg(config) -> T5Config:
    return config if isinstance(config, T5Config) else T5Config.from_dict(config)


def _ff_names(c: T5Config) -> tuple[str, ...]:
    return ("wi_0", "wi_1", "wo") if c.gated else ("wi", "wo")


def _bias_key(n: int) -> str:
    return f"encoder.block.{n}.layer.0.SelfAttention.relative_attention_bias.weight"


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """{HF key: shape} of every weight the encoder uses (the embedding as `shared.weight`)."""
    c = _cfg(config)
    d, inner, f = c.d_model, c.num_heads * c.d_kv, c.d_ff
    out = {EMBED_KEY: (c.vocab_size, d)}
    for n in range(c.num_layers):
        attn = f"encoder.block.{n}.layer.0"
        for w in "qkv":
            out[f"{attn}.SelfAttention.{w}.weight"] = (inner, d)
        out[f"{attn}.SelfAttention.o.weight"] = (d, inner)
        if n == 0 or c.bias_every_layer:
            out[_bias_key(n)] = (c.relative_attention_num_buckets, c.num_heads)
        out[f"{attn}.layer_norm.weight"] = (d,)
        ff = f"encoder.block.{n}.layer.1"
        for w in _ff_names(c):
            out[f"{ff}.DenseReluDense.{w}.weight"] = (d, f) if w == "wo" else (f, d)
        out[f"{ff}.layer_norm.weight"] = (d,)
    out["encoder.final_layer_norm.weight"] = (d,)
    return out


def optional_shapes(config) -> dict[str, tuple[int, ...]]:
    """The tied alias of the embedding (the `decoder.`/`lm_head.` keys are dropped by
    `encoder_keys` before the check; they are never read)."""
    c = _cfg(config)
    return {EMBED_ALIAS: (c.vocab_size, c.d_model)}


def encoder_keys(found: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint's table seen by the encoder: decoder/lm_head dropped, and the alias
    `encoder.embed_tokens.weight` renamed `shared.weight` when that is absent."""
    out = {k: v for k, v in found.items() if not k.startswith(UNUSED_PREFIXES)}
    if EMBED_KEY not in out and EMBED_ALIAS in out:
        out[EMBED_KEY] = out.pop(EMBED_ALIAS)
    return out


def params_from_state_dict(tensors: Mapping[str, np.ndarray], config) -> dict:
    """The params pytree from HF-named tensors (passed through `encoder_keys` and checked).

    Linear weights [out, in] are transposed for x @ W; layers are stacked for `lax.scan`.
    """
    c = _cfg(config)
    tensors = encoder_keys(tensors)
    f32 = lambda k: np.asarray(tensors[k], np.float32)
    stack = lambda fmt, t: jnp.asarray(
        np.stack([f32(fmt.format(n)).T if t else f32(fmt.format(n)) for n in range(c.num_layers)])
    )
    layers = {
        w: stack(f"encoder.block.{{}}.layer.0.SelfAttention.{w}.weight", True) for w in "qkvo"
    }
    layers["ln1"] = stack("encoder.block.{}.layer.0.layer_norm.weight", False)
    layers["ln2"] = stack("encoder.block.{}.layer.1.layer_norm.weight", False)
    for w in _ff_names(c):
        layers[w] = stack(f"encoder.block.{{}}.layer.1.DenseReluDense.{w}.weight", True)
    if c.bias_every_layer:
        layers["rel_bias"] = stack(_bias_key(0).replace(".0.", ".{}.", 1), False)
    params = {
        "config": c,
        "embed": jnp.asarray(f32(EMBED_KEY)),
        "layers": layers,
        "final_ln": jnp.asarray(f32("encoder.final_layer_norm.weight")),
    }
    if not c.bias_every_layer:
        params["rel_bias"] = jnp.asarray(f32(_bias_key(0)))
    return params


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """[L query, L key] int32 bucket of (key - query), bidirectional, as HF computes it
    (float32 log, truncation toward zero); numpy, since L is static."""
    rel = np.arange(length)[None, :] - np.arange(length)[:, None]
    half = num_buckets // 2
    buckets = (rel > 0).astype(np.int64) * half
    rel = np.abs(rel)
    max_exact = half // 2
    with np.errstate(divide="ignore"):
        large = np.log(rel.astype(np.float32) / np.float32(max_exact)) / np.float32(
            math.log(max_distance / max_exact)
        )
    large = np.where(rel < max_exact, 0, large * np.float32(half - max_exact))  # finite casts
    large = np.minimum(max_exact + large.astype(np.int64), half - 1)
    return (buckets + np.where(rel < max_exact, rel, large)).astype(np.int32)


def _rms_norm(x, scale, eps):
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + eps) * scale


def encode(params: dict, ids_NL: jax.Array, mask_NL: jax.Array) -> jax.Array:
    """Last hidden state [N, L, d_model] (T5EncoderModel's `last_hidden_state`) for token ids
    and a bool mask (True = token); padded positions attend nowhere and are returned as zeros."""
    c: T5Config = params["config"]
    n, length = ids_NL.shape
    heads, dk = c.num_heads, c.d_kv
    mask_NL = mask_NL.astype(bool)
    buckets = relative_position_buckets(
        length, c.relative_attention_num_buckets, c.relative_attention_max_distance
    )
    key_ok = mask_NL[:, None, None, :]  # [N, 1 head, 1 query, L key]
    act = _ACTS[c.act]

    def bias_HLL(table_BH):
        return jnp.transpose(table_BH[buckets], (2, 0, 1))

    shared_bias = None if c.bias_every_layer else bias_HLL(params["rel_bias"])

    def layer(x, p):
        h = _rms_norm(x, p["ln1"], c.layer_norm_epsilon)
        split = lambda t: t.reshape(n, length, heads, dk)
        q, k, v = split(h @ p["q"]), split(h @ p["k"]), split(h @ p["v"])
        bias = bias_HLL(p["rel_bias"]) if c.bias_every_layer else shared_bias
        s = jnp.einsum("nqhd,nkhd->nhqk", q, k) + bias[None]  # no 1/sqrt(d_kv): T5
        s = jnp.where(key_ok, s, jnp.finfo(jnp.float32).min)
        a = jnp.einsum("nhqk,nkhd->nqhd", jax.nn.softmax(s, axis=-1), v)
        x = x + a.reshape(n, length, heads * dk) @ p["o"]
        h = _rms_norm(x, p["ln2"], c.layer_norm_epsilon)
        f = act(h @ p["wi_0"]) * (h @ p["wi_1"]) if c.gated else act(h @ p["wi"])
        return x + f @ p["wo"], None

    x = params["embed"][ids_NL].astype(jnp.float32)
    x, _ = jax.lax.scan(layer, x, params["layers"])
    x = _rms_norm(x, params["final_ln"], c.layer_norm_epsilon)
    return jnp.where(mask_NL[..., None], x, 0.0)
