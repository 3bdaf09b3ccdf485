"""Model FLOPs and hardware FLOPs of the DiT train step, and the peak that turns them into MFU/HFU.

Two counts, as PaLM (Chowdhery et al. 2022, appendix B) defines MFU and HFU:

- **model FLOPs**: the work the model needs for the real examples of a batch, whatever computes
  it: per-token layers for real tokens only (padding is free), self-attention within each
  segment (`sum_i n_i^2` query-key pairs), cross-attention from each segment to its own caption's
  real tokens (`sum_i n_i m_i`), the caption encoder on real caption tokens (`sum_i m_i^2` pairs),
  per-segment conditioning for real segments. MFU = model FLOPs / time / peak compares backends,
  packings and other systems fairly.
- **hardware FLOPs**: what the chosen backend computes on the batch's static shapes: every slot of
  every pack, dense `L x L` self-attention for `xla`, `context` and `ring`, the computed tiles for
  `splash` (jaxsora/models/splash.py), the windows of `windowed` (jaxsora/models/windowed.py),
  cross-attention to all `S*Lt` caption slots (to its window with `windowed`), the encoder on
  all `S*Lt` slots, plus what `remat` recomputes. HFU = hardware FLOPs / time / peak.

A train step is the forward pass plus a backward pass of twice its matmuls, except where no
input gradient exists: `patch_in` reads data and the first time-MLP layer reads the sinusoidal
features of t, so their backward is the weight gradient alone. Only matmuls are counted; norms,
softmax, activations and the optimizer are a few percent on top (tests/test_flops.py states the
agreement with XLA's own cost analysis of the compiled step).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxsora.models import windowed
from jaxsora.models.dit import DiTConfig, attention_windows

# bf16 dense peak per chip, for accelerators where a matmul probe is not what users quote.
KNOWN_PEAKS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
}
TIME_FEATURES = 256  # sinusoidal features of t (jaxsora/models/dit.py)
# Per-token time: every segment's conditioning is computed for its t and for 0 (clean
# conditioning tokens), so the time MLP and the adaLN layers run twice per segment.
TIMES_PER_SEGMENT = 2
SPLASH_BLOCK = 128  # jaxsora/models/splash.py's default q and kv block
DENSE_BACKENDS = ("xla", "context", "ring")  # every backend but splash computes all L x L scores


@dataclasses.dataclass(frozen=True)
class Work:
    """How much of each kind of thing one forward pass processes, summed over the batch."""

    tokens: float  # through the per-token layers
    segments: float  # through the per-segment conditioning
    caption_tokens: float  # through the caption encoder and the cross-attention keys/values
    self_pairs: float  # self-attention query-key pairs, per block
    cross_pairs: float  # cross-attention query-key pairs, per block
    caption_pairs: float  # caption-encoder query-key pairs, per layer
    # Pairs whose backward recomputes the scores (the windowed backend's windows): one more
    # q.k per pair in the backward pass, per block.
    rescored_pairs: float = 0.0


@dataclasses.dataclass(frozen=True)
class StepFlops:
    model: float
    hardware: float

    def __add__(self, other: StepFlops) -> StepFlops:
        return StepFlops(self.model + other.model, self.hardware + other.hardware)


def forward_parts(
    cfg: DiTConfig, w: Work, times_per_segment: int = TIMES_PER_SEGMENT
) -> dict[str, float]:
    """Matmul FLOPs of one forward pass by part (2 FLOPs per multiply-add). `times_per_segment`
    = 1 is the model without per-token time (what it costs: `per_token_time_flops`)."""
    D, Dt, P, depth = cfg.width, cfg.text_width, cfg.patch_dim, cfg.depth
    hidden = int(cfg.mlp_ratio * D)
    P_out = P * (2 if cfg.learn_sigma else 1)
    if cfg.num_classes:  # a label embedding (a lookup: no FLOPs), no captions, no cross-attention
        w = dataclasses.replace(w, caption_tokens=0.0, cross_pairs=0.0, caption_pairs=0.0)
        Dt = 0
    cross_qo = 0 if cfg.num_classes else 2 * 2 * D * D
    per_block_token = 2 * 4 * D * D + cross_qo + 2 * 2 * D * hidden  # self qkvo, cross qo, MLP
    per_block = (
        w.tokens * per_block_token
        + w.caption_tokens * 2 * 2 * D * D  # cross-attention keys and values
        + times_per_segment * w.segments * 2 * D * 6 * D  # adaLN modulation
    )
    attention = 2 * 2 * D * (w.self_pairs + w.cross_pairs)  # scores and weighted values, all heads
    caption_layer = w.caption_tokens * (2 * 4 * Dt * Dt + 2 * 2 * Dt * 4 * Dt)
    return {
        "patch_in": w.tokens * 2 * P * D,
        "time_mlp1": times_per_segment * w.segments * 2 * TIME_FEATURES * D,
        "blocks_dense": depth * per_block,
        "blocks_attention": depth * attention,
        # a frozen encoder's embeddings projected in (its own FLOPs are not the DiT's: it
        # runs once per caption, before the step), the trained layers, then caption_proj
        "captions": w.caption_tokens * 2 * cfg.text_embed_dim * Dt
        + cfg.text_depth * (caption_layer + 2 * 2 * Dt * w.caption_pairs)
        + w.caption_tokens * 2 * Dt * D,
        # time_mlp2 and the final adaLN per time, caption_pool once per segment
        "conditioning": w.segments * (times_per_segment * (2 * D * D + 2 * D * 2 * D) + 2 * Dt * D),
        "patch_out": w.tokens * 2 * D * P_out,
    }


def step_flops(
    cfg: DiTConfig, w: Work, remat: str = "none", times_per_segment: int = TIMES_PER_SEGMENT
) -> float:
    """Forward + backward FLOPs of a train step over `w`, with what `remat` recomputes."""
    parts = forward_parts(cfg, w, times_per_segment)
    total = 3 * sum(parts.values()) - parts["patch_in"] - parts["time_mlp1"]
    total += cfg.depth * 2 * cfg.width * w.rescored_pairs
    if remat == "full":  # the whole block runs forward again in the backward pass
        total += parts["blocks_dense"] + parts["blocks_attention"]
    elif remat == "dots":  # matmuls without batch dims are kept; attention's batched ones rerun
        total += parts["blocks_attention"]
    return float(total)


def segment_sizes(segment_ids_BL: np.ndarray, text_mask_BSLt: np.ndarray):
    """(tokens n_i, caption tokens m_i) of every real segment of the batch, as two flat arrays."""
    seg = np.asarray(segment_ids_BL)
    B, S = np.asarray(text_mask_BSLt).shape[:2]
    counts_BS = np.stack([np.bincount(seg[b], minlength=S + 1)[1 : S + 1] for b in range(B)])
    captions_BS = np.asarray(text_mask_BSLt).sum(-1)
    real = counts_BS > 0
    return counts_BS[real].astype(np.float64), captions_BS[real].astype(np.float64)


def model_work(segment_ids_BL: np.ndarray, text_mask_BSLt: np.ndarray) -> Work:
    n, m = segment_sizes(segment_ids_BL, text_mask_BSLt)
    return Work(
        tokens=n.sum(),
        segments=float(n.size),
        caption_tokens=m.sum(),
        self_pairs=(n * n).sum(),
        cross_pairs=(n * m).sum(),
        caption_pairs=(m * m).sum(),
    )


def splash_tiles(seg_BL: np.ndarray, block: int = SPLASH_BLOCK) -> int:
    """Tiles splash computes per head for self-attention (`splash.splash_block_mask`, in NumPy)."""
    seg = np.asarray(seg_BL)
    B, L = seg.shape
    blocks = seg.reshape(B, L // block, block)
    big = np.iinfo(np.int32).max
    lo = np.where(blocks > 0, blocks, big).min(-1)
    hi = np.where(blocks > 0, blocks, 0).max(-1)
    pad = (blocks == 0).any(-1)
    overlap = (lo[:, :, None] <= hi[:, None, :]) & (lo[:, None, :] <= hi[:, :, None])
    return int((overlap | (pad[:, :, None] & pad[:, None, :])).sum())


def windowed_pairs(seg_q_BL, seg_kv_BM, window: int, block: int) -> int:
    """Query-key pairs the `windowed` backend computes: `window` keys per block of `block`
    queries, or all of them where it takes the dense path (jaxsora/models/windowed.py)."""
    B, L = np.asarray(seg_q_BL).shape
    M = np.asarray(seg_kv_BM).shape[1]
    if 2 * window > M:  # the plain dense path (autodiff's backward: no rescoring)
        return B * L * M
    _, fits = windowed.window_plan(np.asarray(seg_q_BL), np.asarray(seg_kv_BM), block, window)
    blocks = -(-L // block)
    return B * blocks * block * (window if bool(fits) else M)


def caption_segment_ids(text_mask_BSLt: np.ndarray) -> np.ndarray:
    """The cross-attention keys' segment ids [B, S*Lt], as jaxsora/models/dit.py forms them."""
    mask = np.asarray(text_mask_BSLt)
    B, S, _ = mask.shape
    return np.where(mask, np.arange(1, S + 1)[None, :, None], 0).reshape(B, -1)


def hardware_work(
    segment_ids_BL: np.ndarray, text_mask_BSLt: np.ndarray, backend: str, cfg: DiTConfig = None
) -> Work:
    """What `backend` computes on these packs; `windowed` needs the model's `cfg` (its
    windows)."""
    B, L = np.asarray(segment_ids_BL).shape
    S, Lt = np.asarray(text_mask_BSLt).shape[1:]
    cross_pairs = B * L * S * Lt  # every backend but windowed: the dense xla path
    rescored = 0
    if backend == "splash":
        self_pairs = splash_tiles(segment_ids_BL) * SPLASH_BLOCK * SPLASH_BLOCK
    elif backend in DENSE_BACKENDS:
        self_pairs = B * L * L
    elif backend == "windowed":
        captions = caption_segment_ids(text_mask_BSLt)
        self_w, cross_w = attention_windows(cfg, L, captions)
        block = cfg.attention_block
        self_pairs = windowed_pairs(segment_ids_BL, segment_ids_BL, self_w, block)
        cross_pairs = windowed_pairs(segment_ids_BL, captions, cross_w, block)
        # Its own backward (recomputing the scores) runs where windows exist at this length.
        cross_rescored = cross_pairs * (2 * cross_w <= S * Lt) * (not cfg.num_classes)
        rescored = self_pairs * (2 * self_w <= L) + cross_rescored
    else:
        raise ValueError(f"no FLOP count for attention backend {backend!r}")
    return Work(
        tokens=B * L,
        segments=B * S,
        caption_tokens=B * S * Lt,
        self_pairs=self_pairs,
        cross_pairs=cross_pairs,
        caption_pairs=B * S * Lt * Lt,
        rescored_pairs=rescored,
    )


def train_step_flops(cfg: DiTConfig, batch: dict, work: Work | None = None) -> StepFlops:
    """Model and hardware FLOPs of one train step on `batch` (host arrays: segment_ids,
    text_mask). The model count uses the captions as given; caption dropout shortens a few.
    `work`: the batch's `model_work`, when the caller has it already."""
    seg, text_mask = batch["segment_ids"], batch["text_mask"]
    return StepFlops(
        model=step_flops(cfg, work if work is not None else model_work(seg, text_mask)),
        hardware=step_flops(cfg, hardware_work(seg, text_mask, cfg.attention, cfg), cfg.remat),
    )


def per_token_time_flops(cfg: DiTConfig, batch: dict) -> StepFlops:
    """What per-token time adds to a train step on `batch`: the per-segment layers run for t
    and for 0, against a model with one time per segment."""
    seg, text_mask = batch["segment_ids"], batch["text_mask"]
    model, hardware = model_work(seg, text_mask), hardware_work(seg, text_mask, cfg.attention, cfg)
    return StepFlops(
        model=step_flops(cfg, model) - step_flops(cfg, model, times_per_segment=1),
        hardware=step_flops(cfg, hardware, cfg.remat)
        - step_flops(cfg, hardware, cfg.remat, times_per_segment=1),
    )


def measure_matmul_peak(n: int = 2048, dtype=jnp.float32, seconds: float = 1.0) -> float:
    """FLOP/s of one device on a large square matmul: the practical peak on a CPU."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        f(a).block_until_ready()
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - start)


def device_peak(configured: float) -> tuple[float, str]:
    """(peak FLOP/s per device, where it came from)."""
    if configured > 0:
        return configured, "config"
    kind = jax.devices()[0].device_kind
    for name, peak in KNOWN_PEAKS.items():
        if kind.startswith(name):
            return peak, f"datasheet ({kind})"
    return measure_matmul_peak(), f"measured matmul ({kind})"
