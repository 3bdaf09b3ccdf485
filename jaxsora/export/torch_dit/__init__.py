"""A self-contained PyTorch runtime for DiTs exported by jaxsora (jaxsora/export/dit.py).

    from jaxsora.export.torch_dit import load_pretrained, sample
    model, config = load_pretrained("exported/")          # config.json + model*.safetensors
    v = model(x_BLP, t_BS, segment_ids, positions, text, text_mask, cond_mask)
    x0 = sample(model, config, noise_BLP, segment_ids, positions, grid, text, text_mask,
                steps=32, guidance=3.0, solver="euler")

Needs torch, numpy and safetensors only (no JAX, no other jaxsora module): the folder can be
copied out of the repository and imported on its own as `torch_dit`.
"""

from .model import (
    DiT,
    DiTConfig,
    count_params,
    load_pretrained,
    per_segment,
    rope_angles,
    segment_mask,
)
from .sampler import guided_velocity, sample, segment_latents, time_grid

__all__ = [
    "DiT",
    "DiTConfig",
    "count_params",
    "guided_velocity",
    "load_pretrained",
    "per_segment",
    "rope_angles",
    "sample",
    "segment_latents",
    "segment_mask",
    "time_grid",
]
