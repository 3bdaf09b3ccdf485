"""The diffusion transformer on packs: adaLN-Zero DiT blocks, segment-masked self-attention with
3D RoPE, cross-attention from each segment's tokens to its own caption.

Every conditioning signal is per segment ([B, S, ...]) and reaches tokens through their segment
id, so a pack of several clips is several independent examples: the model's output for a clip
does not depend on what else is in its pack (tests/test_model.py checks this through values and
through gradients).

Time is per token: conditioning tokens (`cond_mask`, the frames of an image-to-video or
extension prompt) are clean, so they are modulated for t = 0 while the rest of their segment is
modulated for its t. Each segment's conditioning is computed for both times ([B, 2S, D]: rows
0..S-1 at t, rows S..2S-1 at 0, as Open-Sora 1.2's `x_mask` does) and each token picks its row;
the extra cost is one more pass of the tiny per-segment layers (jaxsora/flops.py counts it).

The same module is also, by configuration, exactly the DiT paper's class-conditional image model
(`original_dit_fields`): a label embedding (with a null class for guidance) instead of captions
and cross-attention, absolute 2D sin-cos positions instead of RoPE, no QK-norm, and a learned
variance (`learn_sigma`: twice the output channels; the flow trains and samples the first half).
jaxsora/export/diffusers_dit.py maps that configuration to diffusers' `DiTTransformer2DModel`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsora.diffusion.flow import per_segment
from jaxsora.models import windowed
from jaxsora.models.layers import Attention, Mlp, dense, layer_norm
from jaxsora.models.rope import rope_angles
from jaxsora.models.sincos import sincos_2d
from jaxsora.models.text import CaptionEncoder
from jaxsora.sharding import constrain


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    patch_dim: int  # p_t * p_h * p_w * C
    width: int = 256
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    text_vocab: int = 4096
    text_len: int = 16
    text_width: int = 128
    text_depth: int = 2
    text_heads: int = 2
    # Width of a frozen text encoder's embeddings, given to the model instead of hashed ids
    # (jaxsora/text/); 0: hashed ids and the model's own embedding table.
    text_embed_dim: int = 0
    rope_theta: float = 10_000.0
    # NaViT's fractional positions: each token's (h, w) as a fraction of its own frame, as fixed
    # sin-cos features added to the patch embedding. RoPE alone is relative: a token learns
    # where the frame's edges are only through what it attends to.
    frame_positions: bool = False
    # The original DiT's options (the defaults are jaxsora's video DiT):
    # > 0: class-conditional on this many classes (text.encoder = "class"): a label embedding
    # with one more row for the null class, no caption encoder, no cross-attention.
    num_classes: int = 0
    positions: str = "rope"  # "rope" (3D rotary) or "sincos" (DiT's absolute 2D, added once)
    qk_norm: bool = True  # RMSNorm on queries and keys (DiT: none)
    learn_sigma: bool = False  # output 2x channels: [velocity | variance] (DiT's learned sigma)
    # Timestep frequencies exp(-ln(10^4) i / (half - shift)): 0 is the DiT paper's code, 1 is
    # diffusers' (`downscale_freq_shift=1`), the one a diffusers export computes.
    time_freq_shift: int = 0
    mlp_norm_eps: float = 1e-6  # the LayerNorm before the MLP (diffusers' norm_eps: 1e-5)
    dtype: str = "float32"  # compute dtype; parameters are always float32
    attention: str = "xla"
    # The `windowed` backend's query block, and the segment sizes (min, max tokens) its windows
    # are sized for (jaxsora/models/windowed.py; 0 = unknown: dense). Only speed depends on
    # them: a pack they do not fit takes the dense path, with the same numbers.
    attention_block: int = 64
    segment_tokens: tuple[int, int] = (0, 0)
    remat: str = "none"  # what the backward pass recomputes: see REMAT_POLICIES
    scan_layers: bool = True  # one compiled block, looped: compile time independent of depth


# Activation checkpointing per block: "none" keeps everything (fastest, most memory), "full"
# recomputes the block (least memory), "dots" keeps matmul outputs and recomputes the rest.
REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_saveable": jax.checkpoint_policies.checkpoint_dots,
}


POSITIONS = ("rope", "sincos")


def original_dit_fields(num_classes: int) -> dict:
    """The DiTConfig fields that make the model the DiT paper's architecture (with diffusers'
    timestep frequencies, so that it exports exactly: see `time_freq_shift`)."""
    return dict(
        num_classes=num_classes,
        positions="sincos",
        frame_positions=False,
        qk_norm=False,
        learn_sigma=True,
        time_freq_shift=1,
        mlp_ratio=4.0,
    )


def timestep_embedding(
    t: jax.Array, dim: int, max_period: float = 10_000.0, freq_shift: int = 0
) -> jax.Array:
    """Sinusoidal features of t in [0, 1] (scaled by 1000 like DiT's integer steps), cosines
    first; `freq_shift`: see DiTConfig.time_freq_shift."""
    half = dim // 2
    # This operation order is diffusers' (and was ours before freq_shift): float32 rounding of
    # the frequencies shows at t * 1000.
    freqs = jnp.exp(
        -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    )
    args = 1000.0 * t[..., None].astype(jnp.float32) * freqs
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def modulate(x, shift, scale):
    return x * (1.0 + scale) + shift


class DiTBlock(nnx.Module):
    def __init__(self, cfg: DiTConfig, rngs: nnx.Rngs, dtype):
        D = cfg.width
        self.mlp_norm_eps = cfg.mlp_norm_eps
        self.ada = dense(D, 6 * D, ("embed", "mlp"), rngs, dtype, zero=True)
        self.self_attn = Attention(
            D, cfg.num_heads, rngs, dtype, cfg.attention, qk_norm=cfg.qk_norm
        )
        self.cfg = cfg
        # Cross-attention keys are the S*Lt caption tokens: short, never split over `context`,
        # so the dense masked path serves every backend but `windowed`, which reads only the
        # captions of the segments in each query block.
        cross_backend = "windowed" if cfg.attention == "windowed" else "xla"
        self.cross_attn = (
            None
            if cfg.num_classes
            else Attention(
                D, cfg.num_heads, rngs, dtype, cross_backend, cross=True, qk_norm=cfg.qk_norm
            )
        )
        self.mlp = Mlp(D, int(cfg.mlp_ratio * D), rngs, dtype)

    def __call__(self, x_BLD, c_BKD, row_BL, seg_BL, angles, ctx_BMD, ctx_seg_BM):
        mod_BLD6 = per_segment(self.ada(jax.nn.silu(c_BKD)), row_BL)
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod_BLD6, 6, axis=-1)
        h = modulate(layer_norm(x_BLD), shift1, scale1)
        self_window = cross_window = block = None
        if self.self_attn.backend == "windowed":  # exports swap the backend for xla
            self_window, cross_window = attention_windows(self.cfg, x_BLD.shape[1], ctx_seg_BM)
            block = self.cfg.attention_block
        x_BLD = x_BLD + gate1 * self.self_attn(
            h, h, seg_BL, seg_BL, angles, window=self_window, block=block
        )
        if self.cross_attn is not None:
            x_BLD = x_BLD + self.cross_attn(
                layer_norm(x_BLD), ctx_BMD, seg_BL, ctx_seg_BM, window=cross_window, block=block
            )
        h = modulate(layer_norm(x_BLD, self.mlp_norm_eps), shift2, scale2)
        return x_BLD + gate2 * self.mlp(h)


class DiT(nnx.Module):
    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype = jnp.dtype(cfg.dtype)
        D = cfg.width
        self.patch_in = dense(cfg.patch_dim, D, ("patch", "embed"), rngs, dtype)
        self.time_mlp1 = dense(256, D, (None, "embed"), rngs, dtype)
        self.time_mlp2 = dense(D, D, ("embed", "mlp"), rngs, dtype)
        if cfg.positions not in POSITIONS:
            raise ValueError(f"config model.positions={cfg.positions!r} is not one of {POSITIONS}")
        if cfg.num_classes:
            # Row num_classes is the null class (guidance), as DiT's LabelEmbedding with dropout.
            self.label_embed = nnx.Embed(
                cfg.num_classes + 1,
                D,
                embedding_init=nnx.with_partitioning(
                    nnx.initializers.normal(0.02), ("vocab", "embed")
                ),
                dtype=dtype,
                param_dtype=jnp.float32,
                rngs=rngs,
            )
        else:
            self.captions = CaptionEncoder(
                cfg.text_vocab,
                cfg.text_len,
                cfg.text_width,
                cfg.text_depth,
                cfg.text_heads,
                rngs,
                dtype,
                cfg.attention,
                embed_dim=cfg.text_embed_dim,
            )
            self.caption_pool = dense(cfg.text_width, D, ("embed", "mlp"), rngs, dtype)
            self.caption_proj = dense(cfg.text_width, D, ("embed", "mlp"), rngs, dtype)
        if cfg.remat not in ("none", *REMAT_POLICIES):
            raise ValueError(
                f"config model.remat={cfg.remat!r} is not one of {('none', *REMAT_POLICIES)}"
            )
        if cfg.scan_layers:
            # Blocks stacked on a leading `layers` axis: one block is compiled and scanned.
            @nnx.split_rngs(splits=cfg.depth)
            @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_blocks(rngs: nnx.Rngs) -> DiTBlock:
                return DiTBlock(cfg, rngs, dtype)

            self.blocks = make_blocks(rngs)
        else:
            self.blocks = nnx.List([DiTBlock(cfg, rngs, dtype) for _ in range(cfg.depth)])
        self.final_ada = dense(D, 2 * D, ("embed", "mlp"), rngs, dtype, zero=True)
        out_dim = cfg.patch_dim * (2 if cfg.learn_sigma else 1)
        self.patch_out = dense(D, out_dim, ("embed", "patch"), rngs, dtype, zero=True)

    def __call__(
        self,
        x_BLP: jax.Array,
        t_BS: jax.Array,
        segment_ids_BL: jax.Array,
        positions_BL3: jax.Array,
        text_BSLt: jax.Array,
        text_mask_BSLt: jax.Array,
        cond_mask_BL: jax.Array | None = None,
        *,
        all_channels: bool = False,
    ) -> jax.Array:
        """Predicted velocity [B, L, P] for noisy patches x at per-segment times t; tokens in
        `cond_mask_BL` are clean conditioning, seen at time 0. `text_BSLt`: caption ids [B, S,
        Lt], or a frozen encoder's embeddings [B, S, Lt, Dt] (`text_embed_dim`), or class
        labels [B, S, 1] (`num_classes`); a caption whose mask is all False is the null caption
        (the null class). `all_channels`: with `learn_sigma`, [velocity | variance] [B, L, 2P]."""
        cfg = self.cfg
        B, S, Lt = text_mask_BSLt.shape
        dtype = jnp.dtype(cfg.dtype)
        x = self.patch_in(x_BLP.astype(dtype))
        if cfg.positions == "sincos":
            x = x + sincos_2d(positions_BL3, cfg.width).astype(dtype)
        if cfg.frame_positions:
            x = x + frame_position_features(positions_BL3, segment_ids_BL, S, cfg.width).astype(
                dtype
            )
        t_BK = jnp.concatenate([t_BS, jnp.zeros_like(t_BS)], axis=1)  # K = 2S rows: t, then 0
        t_feat = timestep_embedding(t_BK, 256, freq_shift=cfg.time_freq_shift)
        t_emb = self.time_mlp2(jax.nn.silu(self.time_mlp1(t_feat.astype(dtype))))
        if cfg.num_classes:
            label_BS = jnp.where(text_mask_BSLt[..., 0], text_BSLt[..., 0], cfg.num_classes)
            pooled_BSD = self.label_embed(label_BS)
            ctx_BMD = ctx_seg_BM = None
        else:
            text_BSLtE, pooled_BSE, text_mask_BSLt = self.captions(text_BSLt, text_mask_BSLt)
            pooled_BSD = self.caption_pool(pooled_BSE)
            ctx_BMD = self.caption_proj(text_BSLtE).reshape(B, S * Lt, -1)
            seg_of_caption = jnp.arange(1, S + 1, dtype=jnp.int32)[None, :, None]
            ctx_seg_BM = jnp.where(text_mask_BSLt, seg_of_caption, 0).reshape(B, S * Lt)
        c_BKD = t_emb + jnp.concatenate([pooled_BSD, pooled_BSD], axis=1)
        # The per-segment conditioning is tiny ([B, 2S, D]) and every ada layer contracts its
        # whole width, so keep that width unsplit. Left as time_mlp2/caption_pool produce it
        # (width over `tensor`), XLA (GSPMD and Shardy alike, jax 0.10.2) mis-partitioned the
        # backward of per_segment(ada(c)) (a gather along S of a matmul with the ada kernel's
        # input axis over `fsdp`, which also splits the batch): c's gradient, hence the time and
        # caption encoders', came out wrong on data x fsdp x tensor meshes.
        c_BKD = constrain(c_BKD, ("batch", None, None))
        row_BL = conditioning_rows(segment_ids_BL, cond_mask_BL, S)
        angles = (
            rope_angles(positions_BL3, cfg.width // cfg.num_heads, cfg.rope_theta)
            if cfg.positions == "rope"
            else None
        )
        x = constrain(x, ("batch", "length", "embed"))
        x = self._run_blocks(x, c_BKD, row_BL, segment_ids_BL, angles, ctx_BMD, ctx_seg_BM)
        shift, scale = jnp.split(per_segment(self.final_ada(jax.nn.silu(c_BKD)), row_BL), 2, -1)
        out = self.patch_out(modulate(layer_norm(x), shift, scale)).astype(jnp.float32)
        return out if all_channels else out[..., : cfg.patch_dim]

    def _run_blocks(self, x, *context):
        if not self.cfg.scan_layers:
            for block in self.blocks:
                x = _block_fn(self.cfg, *nnx.split(block))(x, *context)
            return x
        # A plain lax.scan over the stacked block state (rather than nnx.scan) works under any
        # outer JAX transform, including jax.grad of a model built outside it.
        graphdef, stacked = nnx.split(self.blocks)
        x, _ = jax.lax.scan(
            lambda x, state: (_block_fn(self.cfg, graphdef, state)(x, *context), None), x, stacked
        )
        return x


def frame_position_features(positions_BL3, segment_ids_BL, num_segments: int, dim: int):
    """[B, L, dim] sin-cos features of each token's (h, w) as a fraction of its segment's frame
    ((p + 0.5) / size: the extent is read off the segment's own positions, so a clip gets the
    same features alone or packed), at frequencies pi, 2 pi, ..., (dim / 4) pi per axis."""
    if dim % 4:
        raise ValueError(f"model.width={dim} must be divisible by 4 for model.frame_positions")
    hw = positions_BL3[..., 1:].astype(jnp.float32)
    ids = num_segments + 1
    extent = jax.vmap(lambda p, s: jax.ops.segment_max(p, s, ids))(hw, segment_ids_BL)
    size = jnp.take_along_axis(extent, segment_ids_BL[..., None], axis=1) + 1.0
    frac = (hw + 0.5) / jnp.maximum(size, 1.0)  # [B, L, 2]
    omega = jnp.pi * jnp.arange(1, dim // 4 + 1, dtype=jnp.float32)
    angles = frac[..., None] * omega  # [B, L, 2, dim / 4]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(*hw.shape[:2], dim)


def attention_windows(cfg: DiTConfig, length: int, ctx_seg_BM) -> tuple[int, int]:
    """Keys per query block of self- and cross-attention for the `windowed` backend, from the
    segment sizes the config expects (jaxsora/models/windowed.py)."""
    min_tokens, max_tokens = cfg.segment_tokens
    block = cfg.attention_block
    self_w = windowed.self_window(max_tokens, block, length)
    if ctx_seg_BM is None:
        return self_w, 0
    captions = ctx_seg_BM.shape[1]
    cross_w = windowed.cross_window(min_tokens, block, captions // cfg.text_len, cfg.text_len)
    return self_w, min(cross_w, captions)


def conditioning_rows(segment_ids_BL, cond_mask_BL, num_segments: int) -> jax.Array:
    """Which row of the [B, 2S] per-segment conditioning each token reads, as a 1-based id for
    `per_segment`: its segment's t row (k), or its 0 row (S + k) when it is a clean
    conditioning token. Padding stays 0 (it reads row 1, and is never scored)."""
    if cond_mask_BL is None:
        return segment_ids_BL
    clean = cond_mask_BL & (segment_ids_BL > 0)
    return segment_ids_BL + num_segments * clean.astype(segment_ids_BL.dtype)


def _block_fn(cfg: DiTConfig, graphdef, state):
    """One block as a function of its input, under jax.checkpoint if the config asks."""

    def call(state, x, *context):
        return nnx.merge(graphdef, state)(x, *context)

    if cfg.remat != "none":
        call = jax.checkpoint(call, policy=REMAT_POLICIES[cfg.remat])
    return functools.partial(call, state)


def make_model(cfg: DiTConfig, seed: int) -> DiT:
    """Builds the model with sharding kept as metadata; jaxsora.sharding places the weights."""
    with nnx.use_eager_sharding(False):
        return DiT(cfg, rngs=nnx.Rngs(seed))
