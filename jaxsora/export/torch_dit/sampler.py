"""The rectified-flow sampler of jaxsora (jaxsora.diffusion.flow.sample with
jaxsora.sample.guided_velocity) in PyTorch, for packs of several requests at once.

t = 1 is noise, t = 0 data; the model predicts v = noise - x0, or with config.json's
`flow.prediction` = "data" the clean data x0, turned into v = (x_t - x0) / t (Heun's last step,
into t = 0, is then Euler). Every segment follows its own resolution-shifted schedule
(sqrt(max(n, base_tokens) / base_tokens) for n tokens), tokens in
`cond_mask` are held at `clean` before every model evaluation and in every result, and guidance
runs all its passes as one batch: two passes (text / null caption) or, with image_guidance != 1
and some conditioning tokens, three (InstructPix2Pix: no text no frames, no text, both).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from .model import DiT, per_segment

SOLVERS = ("euler", "heun")  # velocity evaluations per step: 1 and 2


def resolution_shift(grid_BS3: torch.Tensor, base_tokens: float) -> torch.Tensor:
    """sqrt(max(n, base) / base) per segment; empty segments (zero grid) get 1."""
    tokens = grid_BS3.prod(-1).float()
    return torch.sqrt(tokens.clamp_min(base_tokens) / base_tokens)


def shift_time(t, shift):
    return shift * t / (1.0 + (shift - 1.0) * t)


def unshift_time(t, shift):
    return t / (shift - (shift - 1.0) * t)


def time_grid(num_steps: int, shift_BS: torch.Tensor, start_BS=None) -> torch.Tensor:
    """Per-segment times [num_steps + 1, B, S] from `start_BS` (default 1) down to 0."""
    u = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float32)[:, None, None]
    if start_BS is not None:
        u = u * unshift_time(start_BS.float(), shift_BS)[None]
    t = shift_time(u, shift_BS[None])
    if start_BS is not None:  # exactly the requested start, whatever the rounding
        t[0] = start_BS.float().expand_as(t[0])
    return t


def add_noise(x0, noise, t_tok):
    t = t_tok[..., None]
    return (1.0 - t) * x0 + t * noise


PREDICTIONS = ("velocity", "data")  # jaxsora.diffusion.flow.PREDICTIONS
SAMPLING_MIN_T = 1e-6  # only keeps an evaluation at t = 0 finite; none is made for x0


def velocity_from_output(out_BLP, x_BLP, t_BL, prediction: str) -> torch.Tensor:
    """The velocity the network's output stands for, as jaxsora's sampler reads it
    (jaxsora.diffusion.flow.velocity_from_output with min_t = SAMPLING_MIN_T)."""
    if prediction == "velocity":
        return out_BLP
    if prediction == "data":
        return (x_BLP - out_BLP) / t_BL.clamp_min(SAMPLING_MIN_T)[..., None]
    raise ValueError(f"flow.prediction {prediction!r} is not one of {PREDICTIONS}")


def clamp(x_BLP, clean_BLP, cond_mask_BL):
    return torch.where(cond_mask_BL[..., None], clean_BLP, x_BLP)


def guided_velocity(
    model: DiT,
    x_BLP,
    t_BS,
    segment_ids_BL,
    positions_BL3,
    text_BSLt,
    text_mask_BSLt,
    cond_mask_BL,
    guidance: float,
    image_guidance: float = 1.0,
    clean_BLP=None,
    noise_BLP=None,
    prediction: str = "velocity",
) -> torch.Tensor:
    """v = v_null + guidance (v_text - v_null), both passes in one batch; with image guidance
    (three passes) v = v00 + image_guidance (v0F - v00) + guidance (vTF - v0F), where "no
    frames" clears `cond_mask` and sees the conditioning tokens as (1 - t) clean + t noise.
    `prediction`: what the network outputs (config.json's flow.prediction)."""
    null_mask = torch.zeros_like(text_mask_BSLt)  # the null caption; the ids under it are unread
    three_pass = image_guidance != 1.0 and bool(cond_mask_BL.any())
    n = 3 if three_pass else 2
    rep = lambda a: torch.cat([a] * n, dim=0)  # noqa: E731
    if three_pass:
        free = add_noise(clean_BLP, noise_BLP, per_segment(t_BS[..., None], segment_ids_BL)[..., 0])
        xs = torch.cat([torch.where(cond_mask_BL[..., None], free, x_BLP), x_BLP, x_BLP], 0)
        masks = torch.cat([null_mask, null_mask, text_mask_BSLt], 0)
        conds = torch.cat([torch.zeros_like(cond_mask_BL), cond_mask_BL, cond_mask_BL], 0)
    else:
        xs, masks, conds = rep(x_BLP), torch.cat([text_mask_BSLt, null_mask], 0), rep(cond_mask_BL)
    out = model(
        xs, rep(t_BS), rep(segment_ids_BL), rep(positions_BL3), rep(text_BSLt), masks, conds
    )
    t_BL = per_segment(t_BS[..., None], segment_ids_BL)[..., 0]
    v = velocity_from_output(out, xs, rep(t_BL), prediction)
    if not three_pass:
        v_text, v_null = v.chunk(2, dim=0)
        return v_null + guidance * (v_text - v_null)
    v00, v0f, vtf = v.chunk(3, dim=0)
    return v00 + image_guidance * (v0f - v00) + guidance * (vtf - v0f)


def _tensor(x, dtype=None):
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.array(x, copy=True))
    return t if dtype is None else t.to(dtype)


@torch.no_grad()
def sample(
    model: DiT,
    config: Mapping,
    noise_BLP,
    segment_ids_BL,
    positions_BL3,
    grid_BS3,
    text_BSLt,
    text_mask_BSLt,
    *,
    steps: int | None = None,
    guidance: float | None = None,
    image_guidance: float | None = None,
    solver: str | None = None,
    clean_BLP=None,
    cond_mask_BL=None,
    start_BS=None,
) -> torch.Tensor:
    """The generated tokens [B, L, P] of a pack of requests (each a segment of noise laid out
    in its T x H x W grid, as jaxsora.data.packing builds it); numpy or torch inputs.

    `steps`, `guidance`, `image_guidance` and `solver` default to config.json's `sample`;
    `clean_BLP` and `cond_mask_BL` hold conditioning tokens clean (image-to-video, extension);
    `start_BS` < 1 starts those segments from `clean` noised to that time (SDEdit).
    """
    sc = config.get("sample", {})
    steps = int(steps or sc.get("steps", 32))
    guidance = float(sc.get("guidance", 1.0) if guidance is None else guidance)
    if image_guidance is None:
        image_guidance = sc.get("image_guidance", 1.0)
    image_guidance = float(image_guidance)
    solver = solver or sc.get("solver", "euler")
    if solver not in SOLVERS:
        raise ValueError(f"solver {solver!r} is not one of {SOLVERS}")
    noise = _tensor(noise_BLP, torch.float32)
    seg, pos = _tensor(segment_ids_BL, torch.int32), _tensor(positions_BL3, torch.int32)
    grid = _tensor(grid_BS3)
    text, text_mask = _tensor(text_BSLt), _tensor(text_mask_BSLt, torch.bool)
    clean = torch.zeros_like(noise) if clean_BLP is None else _tensor(clean_BLP, torch.float32)
    cond = (
        torch.zeros(seg.shape, dtype=torch.bool)
        if cond_mask_BL is None
        else _tensor(cond_mask_BL, torch.bool)
    )
    start = None if start_BS is None else _tensor(start_BS, torch.float32)
    shift = resolution_shift(grid, float(config["flow"]["base_tokens"]))
    ts = time_grid(steps, shift, start)
    x = noise
    if start is not None:  # SDEdit: the source noised to its start with the request's noise
        x = add_noise(clean, noise, per_segment(start[..., None], seg)[..., 0])

    prediction = config["flow"].get("prediction", "velocity")

    def velocity(x, t_BS):
        return guided_velocity(
            model,
            x,
            t_BS,
            seg,
            pos,
            text,
            text_mask,
            cond,
            guidance,
            image_guidance,
            clean,
            noise,
            prediction,
        )

    def update(x, v, t, t_next):
        dt = per_segment((t - t_next)[..., None], seg)
        return clamp(x - dt * v, clean, cond)

    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        x = clamp(x, clean, cond)
        v1 = velocity(x, t)
        x_euler = update(x, v1, t, t_next)
        if solver == "euler" or (i == steps - 1 and prediction != "velocity"):
            x = x_euler
        else:
            x = update(x, 0.5 * (v1 + velocity(x_euler, t_next)), t, t_next)
    return clamp(x, clean, cond)


def segment_latents(
    x_BLP, segment_ids_BL, grid_BS3, patch: tuple[int, int, int]
) -> list[list[np.ndarray]]:
    """Per pack, per segment: its tokens as [T, H, W, C] (the inverse of jaxsora's patchify:
    tokens in (t, h, w) order, each patch's features in (pt, ph, pw, c) order)."""
    x, seg, grid = (np.asarray(_tensor(a)) for a in (x_BLP, segment_ids_BL, grid_BS3))
    pt, ph, pw = patch
    out = []
    for b in range(x.shape[0]):
        row = []
        for k, (t, h, w) in enumerate(grid[b]):
            if t * h * w == 0:
                continue
            p = x[b][seg[b] == k + 1].reshape(t, h, w, pt, ph, pw, -1)
            row.append(p.transpose(0, 3, 1, 4, 2, 5, 6).reshape(t * pt, h * ph, w * pw, -1))
        out.append(row)
    return out
