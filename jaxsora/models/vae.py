"""The video compression network: a causal 3D-convolutional VAE (the Wan 2.1 VAE family).

Pixels `[B, T, H, W, 3]` in [-1, 1] become latents `[B, 1 + (T-1)/4, H/8, W/8, z_dim]` (factors
set by the config). Time padding is on the past side only and frame 0 is never mixed with later
frames on the way down, so frame 0 is its own latent frame and an image is a one-frame video.

Why this family: it is causal, has a documented chunked (cached) encode/decode that we must
match anyway, has no GroupNorm (so any width works on small CPU configs), and has public
pretrained weights in diffusers' `AutoencoderKLWan` layout, which `jaxsora/export/vae.py` imports
key for key. Weights and names follow diffusers so that the import is a plain table.

Layout is channels-last throughout. Every causal conv reads and writes a `CausalContext`: the
last frames of its input from the previous chunk (zeros at the start of a clip). A whole clip is
one chunk with `first=True`; `VaeCodec` in `jaxsora/vae_inference.py` feeds the same network a
few frames at a time and carries the context, with the same results up to float rounding.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

CONTEXT_FRAMES = 2  # a 3-frame causal kernel needs the two frames before the chunk


class BadShapeError(ValueError):
    """A clip or latent whose size the VAE cannot take; the message says the nearest valid one."""


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Field names follow diffusers' AutoencoderKLWan config (temperal_ spelled correctly)."""

    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    in_channels: int = 3
    out_channels: int = 3
    dtype: str = "float32"

    def __post_init__(self):
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"VAE config: temporal_downsample has {len(self.temporal_downsample)} entries but "
                f"dim_mult has {len(self.dim_mult)} levels; give one entry per downsampling "
                f"(len(dim_mult) - 1 = {len(self.dim_mult) - 1})"
            )
        if not 1 <= self.z_dim <= 64:
            raise ValueError(f"VAE config: z_dim={self.z_dim} must be in 1..64 (4 to 16 usual)")

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        check_pixel_shape(self, frames, height, width)
        tf, sf = self.temporal_factor, self.spatial_factor
        return 1 + (frames - 1) // tf, height // sf, width // sf, self.z_dim

    def pixel_shape(self, latent_frames: int, height: int, width: int) -> tuple[int, int, int]:
        if latent_frames < 1:
            raise BadShapeError(f"latents have {latent_frames} frames; need at least 1")
        tf, sf = self.temporal_factor, self.spatial_factor
        return 1 + (latent_frames - 1) * tf, height * sf, width * sf


def check_pixel_shape(cfg: VAEConfig, frames: int, height: int, width: int) -> None:
    """Raises BadShapeError naming the bad dimension and the nearest sizes that work."""
    tf, sf = cfg.temporal_factor, cfg.spatial_factor
    if frames < 1 or (frames - 1) % tf:
        lo = 1 + max(0, (frames - 1) // tf) * tf
        raise BadShapeError(
            f"VAE input has T={frames} frames; a causal VAE with {tf}x time compression takes "
            f"T = 1 + {tf}k (1, {1 + tf}, {1 + 2 * tf}, ...): trim the clip to {lo} frames or "
            f"pad it to {lo + tf}"
        )
    for name, size in (("H", height), ("W", width)):
        if size < sf or size % sf:
            lo = max(sf, size // sf * sf)
            raise BadShapeError(
                f"VAE input has {name}={size}; height and width must be multiples of {sf}: "
                f"crop to {lo} or pad to {lo + sf if size >= sf else sf}"
            )


class CausalContext:
    """The frames each causal conv needs from before the current chunk, in call order.

    `previous` is None at the start of a clip (zeros stand in, as zero padding would) or the
    list that the previous chunk's `carried` returned. `first` marks the chunk that holds the
    clip's frame 0, which the temporal resamplers treat on its own.
    """

    def __init__(self, previous: list[jax.Array] | None = None, first: bool = True):
        self.previous, self.first = previous, first
        self.carried: list[jax.Array] = []
        self._next = 0

    def take(self) -> jax.Array | None:
        if self.previous is None:
            return None
        entry = self.previous[self._next]
        self._next += 1
        return entry

    def carry(self, frames: jax.Array) -> None:
        self.carried.append(frames)


def _conv(x, kernel, stride, padding, dtype):
    """N-d convolution, channels-last; `x` is [N, *spatial, C], kernel [*window, Cin, Cout]."""
    if kernel.ndim == 5 and jax.default_backend() == "cpu":
        return _conv3d_as_2d(x, kernel, stride, padding, dtype)
    nd = kernel.ndim - 2
    letters = "DHW"[-nd:]
    return jax.lax.conv_general_dilated(
        x.astype(dtype),
        kernel.astype(dtype),
        window_strides=stride,
        padding=padding,
        dimension_numbers=(f"N{letters}C", f"{letters}IO", f"N{letters}C"),
        preferred_element_type=jnp.float32,
    )


def _conv3d_as_2d(x, kernel, stride, padding, dtype):
    """A 3D conv as a sum over the kernel's time taps of 2D convs on frames.

    Why: XLA's CPU 3D convolution is 4-7x slower than its 2D one at the VAE's channel counts
    (forward + backward, 16-64 channels); the sum is the same arithmetic in another order.
    """
    kt, st = kernel.shape[0], stride[0]
    B, T = x.shape[:2]
    T_out = (T - kt) // st + 1
    out = 0.0
    for t in range(kt):
        frames = x[:, t : t + st * (T_out - 1) + 1 : st]
        y = _conv(
            frames.reshape(B * T_out, *x.shape[2:]), kernel[t], stride[1:], padding[1:], dtype
        )
        out = out + y
    return out.reshape(B, T_out, *out.shape[1:])


def _kernel_init(fan_in: int):
    """He-normal kernels (variance 2 / fan_in, for SiLU)."""
    std = math.sqrt(2.0 / fan_in)
    return lambda key, shape: std * jax.random.normal(key, shape, jnp.float32)


def _zeros(key, shape):
    # Zero biases, not PyTorch's uniform ones: under Wan's RMSNorm a random bias that outweighs
    # a small input direction normalises every input to nearly the same vector, and training
    # from scratch then collapses to a few outputs (seen on CPU runs; fine-tuning imported
    # weights is unaffected).
    del key
    return jnp.zeros(shape, jnp.float32)


class CausalConv3d(nnx.Module):
    """3D conv, zero-padded in space, padded (or fed from the context) on the past side in time."""

    def __init__(self, cin, cout, kernel=3, stride=1, *, rngs, dtype, time_pad=None):
        k = (kernel,) * 3 if isinstance(kernel, int) else tuple(kernel)
        s = (stride,) * 3 if isinstance(stride, int) else tuple(stride)
        self.stride, self.dtype = s, dtype
        # Causal: all of the kernel's time extent is in the past (diffusers: 2 * padding[0]).
        self.time_pad = k[0] - 1 if time_pad is None else time_pad
        init = _kernel_init(cin * math.prod(k))
        self.kernel = nnx.Param(init(rngs.params(), (*k, cin, cout)))
        self.bias = nnx.Param(_zeros(None, (cout,)))

    def __call__(self, x_BTHWC: jax.Array, ctx: CausalContext | None = None) -> jax.Array:
        kt, kh, kw = self.kernel.shape[:3]
        if self.time_pad:
            past = ctx.take() if ctx is not None else None
            if past is None:
                past = jnp.zeros(
                    (*x_BTHWC.shape[:1], self.time_pad, *x_BTHWC.shape[2:]), x_BTHWC.dtype
                )
            x_BTHWC = jnp.concatenate([past.astype(x_BTHWC.dtype), x_BTHWC], axis=1)
            if ctx is not None:
                ctx.carry(x_BTHWC[:, -self.time_pad :])
        pad = [(0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)]
        y = _conv(x_BTHWC, self.kernel[...], self.stride, pad, self.dtype)
        return (y + self.bias[...]).astype(self.dtype)


class Conv2d(nnx.Module):
    """Per-frame 2D conv for the spatial resamplers (diffusers' `resample.1`)."""

    def __init__(self, cin, cout, stride=1, *, rngs, dtype):
        self.stride, self.dtype = stride, dtype
        init = _kernel_init(cin * 9)
        self.kernel = nnx.Param(init(rngs.params(), (3, 3, cin, cout)))
        self.bias = nnx.Param(_zeros(None, (cout,)))

    def __call__(self, x_NHWC: jax.Array) -> jax.Array:
        # Stride 2 as diffusers: ZeroPad2d((0, 1, 0, 1)) then an unpadded conv.
        pad = [(0, 1), (0, 1)] if self.stride == 2 else [(1, 1), (1, 1)]
        y = _conv(x_NHWC, self.kernel[...], (self.stride,) * 2, pad, self.dtype)
        return (y + self.bias[...]).astype(self.dtype)


class RMSNorm(nnx.Module):
    """Wan's norm: x / ||x|| over channels * sqrt(C) * gamma, in float32."""

    def __init__(self, dim: int):
        self.gamma = nnx.Param(jnp.ones((dim,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(x32), -1, keepdims=True))
        scale = math.sqrt(x.shape[-1])
        return (x32 / jnp.maximum(norm, 1e-12) * scale * self.gamma[...]).astype(x.dtype)


class ResidualBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, *, rngs, dtype):
        self.norm1 = RMSNorm(cin)
        self.conv1 = CausalConv3d(cin, cout, 3, rngs=rngs, dtype=dtype)
        self.norm2 = RMSNorm(cout)
        self.conv2 = CausalConv3d(cout, cout, 3, rngs=rngs, dtype=dtype)
        self.conv_shortcut = (
            CausalConv3d(cin, cout, 1, rngs=rngs, dtype=dtype) if cin != cout else None
        )

    def __call__(self, x: jax.Array, ctx: CausalContext) -> jax.Array:
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        x = self.conv1(jax.nn.silu(self.norm1(x)), ctx)
        x = self.conv2(jax.nn.silu(self.norm2(x)), ctx)
        return x + shortcut


class AttentionBlock(nnx.Module):
    """Single-head self-attention within each frame (never across time, so it stays causal)."""

    def __init__(self, dim: int, *, rngs, dtype):
        self.dtype = dtype
        self.norm = RMSNorm(dim)
        init = _kernel_init(dim)
        self.to_qkv = nnx.Linear(
            dim,
            3 * dim,
            kernel_init=lambda k, s, d=None: init(k, s),
            bias_init=lambda k, s, d=None: _zeros(k, s),
            dtype=dtype,
            rngs=rngs,
        )
        self.proj = nnx.Linear(
            dim,
            dim,
            kernel_init=lambda k, s, d=None: init(k, s),
            bias_init=lambda k, s, d=None: _zeros(k, s),
            dtype=dtype,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array, ctx: CausalContext | None = None) -> jax.Array:
        B, T, H, W, C = x.shape
        q, k, v = jnp.split(self.to_qkv(self.norm(x)).reshape(B * T, H * W, 3 * C), 3, -1)
        scores = jnp.einsum("nqc,nkc->nqk", q, k, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(scores / math.sqrt(C), axis=-1).astype(v.dtype)
        out = jnp.einsum("nqk,nkc->nqc", weights, v).reshape(B, T, H, W, C)
        return x + self.proj(out)


def _interleave_time(y_BTHW2C: jax.Array) -> jax.Array:
    """[B, T, H, W, 2C] -> [B, 2T, H, W, C]: channel half 0 is the earlier frame (diffusers)."""
    B, T, H, W, C2 = y_BTHW2C.shape
    y = y_BTHW2C.reshape(B, T, H, W, 2, C2 // 2).transpose(0, 1, 4, 2, 3, 5)
    return y.reshape(B, 2 * T, H, W, C2 // 2)


def _per_frame(fn, x_BTHWC: jax.Array) -> jax.Array:
    B, T = x_BTHWC.shape[:2]
    y = fn(x_BTHWC.reshape(B * T, *x_BTHWC.shape[2:]))
    return y.reshape(B, T, *y.shape[1:])


class Resample(nnx.Module):
    """2x spatial (and optionally temporal) down- or upsampling, Wan's `WanResample`.

    Temporal downsampling is a stride-2 causal conv over (last frame of the previous chunk, this
    chunk); the clip's frame 0 skips it, so T = 1 + 2k frames become 1 + k. Temporal upsampling
    doubles every frame but frame 0 with a conv to 2C channels; frames after 0 see zero padding
    before them, not frame 0, exactly as diffusers' "Rep" cache does.
    """

    def __init__(self, dim: int, mode: str, *, rngs, dtype, out_dim: int | None = None):
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = Conv2d(dim, out_dim or dim // 2, rngs=rngs, dtype=dtype)
        else:
            self.resample = Conv2d(dim, dim, stride=2, rngs=rngs, dtype=dtype)
        time_conv = None
        if mode == "upsample3d":
            time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), rngs=rngs, dtype=dtype)
        elif mode == "downsample3d":
            time_conv = CausalConv3d(
                dim, dim, (3, 1, 1), (2, 1, 1), rngs=rngs, dtype=dtype, time_pad=0
            )
        self.time_conv = time_conv

    def __call__(self, x: jax.Array, ctx: CausalContext) -> jax.Array:
        if self.mode == "upsample3d":
            x = self._upsample_time(x, ctx)
        if self.mode.startswith("upsample"):
            x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)  # nearest, 2x
        x = _per_frame(self.resample, x)
        if self.mode == "downsample3d":
            x = self._downsample_time(x, ctx)
        return x

    def _upsample_time(self, x, ctx):
        if not ctx.first:
            return _interleave_time(self.time_conv(x, ctx))
        head, rest = x[:, :1], x[:, 1:]
        if rest.shape[1] == 0:  # only frame 0: nothing to upsample, the context stays zeros
            ctx.take()
            ctx.carry(jnp.zeros((*x.shape[:1], CONTEXT_FRAMES, *x.shape[2:]), x.dtype))
            return head
        return jnp.concatenate([head, _interleave_time(self.time_conv(rest, ctx))], axis=1)

    def _downsample_time(self, x, ctx):
        past = ctx.take()
        ctx.carry(x[:, -1:])
        if ctx.first:
            if x.shape[1] == 1:
                return x
            return jnp.concatenate([x[:, :1], self.time_conv(x)], axis=1)
        return self.time_conv(jnp.concatenate([past.astype(x.dtype), x], axis=1))


class MidBlock(nnx.Module):
    def __init__(self, dim: int, *, rngs, dtype):
        self.resnets = nnx.List([ResidualBlock(dim, dim, rngs=rngs, dtype=dtype) for _ in "ab"])
        self.attentions = nnx.List([AttentionBlock(dim, rngs=rngs, dtype=dtype)])

    def __call__(self, x, ctx):
        x = self.resnets[0](x, ctx)
        return self.resnets[1](self.attentions[0](x), ctx)


class Encoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, rngs, dtype):
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv_in = CausalConv3d(cfg.in_channels, dims[0], 3, rngs=rngs, dtype=dtype)
        blocks, scale = [], 1.0
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(cin, cout, rngs=rngs, dtype=dtype))
                if scale in cfg.attn_scales:
                    blocks.append(AttentionBlock(cout, rngs=rngs, dtype=dtype))
                cin = cout
            if i != len(cfg.dim_mult) - 1:
                mode = "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"
                blocks.append(Resample(cout, mode, rngs=rngs, dtype=dtype))
                scale /= 2.0
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(dims[-1], rngs=rngs, dtype=dtype)
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, 3, rngs=rngs, dtype=dtype)

    def __call__(self, x, ctx):
        x = self.conv_in(x, ctx)
        for block in self.down_blocks:
            x = block(x, ctx)
        x = self.mid_block(x, ctx)
        return self.conv_out(jax.nn.silu(self.norm_out(x)), ctx)


class UpBlock(nnx.Module):
    def __init__(self, cin, cout, num_res_blocks, mode, *, rngs, dtype):
        self.resnets = nnx.List(
            [
                ResidualBlock(c, cout, rngs=rngs, dtype=dtype)
                for c in [cin] + [cout] * num_res_blocks
            ]
        )
        # A list of one, as in diffusers, so weight names line up with `upsamplers.0`.
        self.upsamplers = nnx.List([Resample(cout, mode, rngs=rngs, dtype=dtype)] if mode else [])

    def __call__(self, x, ctx):
        for resnet in self.resnets:
            x = resnet(x, ctx)
        for upsampler in self.upsamplers:
            x = upsampler(x, ctx)
        return x


class Decoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, rngs, dtype):
        base = cfg.decoder_base_dim or cfg.base_dim
        mults = cfg.dim_mult
        dims = [base * m for m in (mults[-1], *mults[::-1])]
        temporal_upsample = cfg.temporal_downsample[::-1]
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], 3, rngs=rngs, dtype=dtype)
        self.mid_block = MidBlock(dims[0], rngs=rngs, dtype=dtype)
        blocks = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            if i > 0:
                cin //= 2  # the previous upsampler's conv halves the channels (Wan 2.1)
            mode = None
            if i != len(mults) - 1:
                mode = "upsample3d" if temporal_upsample[i] else "upsample2d"
            blocks.append(UpBlock(cin, cout, cfg.num_res_blocks, mode, rngs=rngs, dtype=dtype))
        self.up_blocks = nnx.List(blocks)
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], cfg.out_channels, 3, rngs=rngs, dtype=dtype)

    def __call__(self, z, ctx):
        x = self.conv_in(z, ctx)
        x = self.mid_block(x, ctx)
        for block in self.up_blocks:
            x = block(x, ctx)
        return self.conv_out(jax.nn.silu(self.norm_out(x)), ctx)


class VideoVAE(nnx.Module):
    """Encoder, decoder and the 1x1x1 convs around the latent (diffusers' quant convs)."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype = jnp.dtype(cfg.dtype)
        self.encoder = Encoder(cfg, rngs=rngs, dtype=dtype)
        self.quant_conv = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1, rngs=rngs, dtype=dtype)
        self.post_quant_conv = CausalConv3d(cfg.z_dim, cfg.z_dim, 1, rngs=rngs, dtype=dtype)
        self.decoder = Decoder(cfg, rngs=rngs, dtype=dtype)

    def encode(
        self, video_BTHWC: jax.Array, ctx: CausalContext | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Posterior mean and log-variance, float32 [B, T', H', W', z_dim]."""
        ctx = ctx or CausalContext()
        if ctx.first:
            check_pixel_shape(self.cfg, *video_BTHWC.shape[1:4])
        moments = self.quant_conv(self.encoder(video_BTHWC, ctx)).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z_BTHWC: jax.Array, ctx: CausalContext | None = None) -> jax.Array:
        """Pixels [B, T, H, W, 3], float32, not clamped (the training loss wants gradients)."""
        ctx = ctx or CausalContext()
        x = self.decoder(self.post_quant_conv(z_BTHWC), ctx)
        return x.astype(jnp.float32)

    def __call__(
        self, video_BTHWC: jax.Array, key: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Reconstruction from a posterior sample, plus the posterior (for the KL term)."""
        mean, logvar = self.encode(video_BTHWC)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
        return self.decode(z), mean, logvar


def make_vae(cfg: VAEConfig, seed: int = 0) -> VideoVAE:
    with nnx.use_eager_sharding(False):
        return VideoVAE(cfg, rngs=nnx.Rngs(seed))


def vae_config_from_dict(d) -> VAEConfig:
    """From an ml_collections/dict config section; lists become tuples (the config is hashable)."""
    fields = {f.name for f in dataclasses.fields(VAEConfig)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ValueError(f"VAE config has unknown fields {unknown}; known: {sorted(fields)}")
    return VAEConfig(**{k: tuple(v) if isinstance(v, list | tuple) else v for k, v in d.items()})
