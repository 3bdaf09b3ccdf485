"""Analytic FLOPs of the DiT train step, and a measured matmul rate to divide them by (MFU).

Counted: every matmul of the forward pass for every token of the pack (padding included; the
packer's efficiency is reported on its own), attention scores as the backend computes them
(xla: dense L x L), and the caption encoder. A train step is 3x the forward pass.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from jaxsora.models.dit import DiTConfig

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


def forward_flops(cfg: DiTConfig, batch: int, seq_len: int, max_segments: int) -> float:
    D, Dt, Lt, L, S = cfg.width, cfg.text_width, cfg.text_len, seq_len, max_segments
    hidden = int(cfg.mlp_ratio * D)
    per_token = (
        2 * 4 * D * D  # self-attention q, k, v, out
        + 2 * 2 * D * D  # cross-attention q, out
        + 2 * 2 * D * hidden  # MLP
    ) * cfg.depth + 2 * 2 * cfg.patch_dim * D
    attention = cfg.depth * (2 * 2 * L * L * D + 2 * 2 * L * S * Lt * D)
    # Captions are projected to the model width once, then to keys and values in every block.
    context = cfg.depth * 2 * 2 * D * D * S * Lt + 2 * Dt * D * S * Lt
    text = cfg.text_depth * S * Lt * (2 * 4 * Dt * Dt + 2 * 2 * Dt * 4 * Dt + 2 * 2 * Lt * Dt)
    per_segment = cfg.depth * 2 * D * 6 * D + 2 * D * 2 * D + 2 * 2 * 256 * D
    return float(batch * (per_token * L + attention + context + text + per_segment * S))


def train_step_flops(cfg: DiTConfig, batch: int, seq_len: int, max_segments: int) -> float:
    return 3.0 * forward_flops(cfg, batch, seq_len, max_segments)


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
