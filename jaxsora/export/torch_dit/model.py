"""jaxsora's packed DiT in plain PyTorch, with the same parameter names as `export_dit` writes.

Written the way a PyTorch user would write it (nn.Linear, F.layer_norm, F.rms_norm,
F.scaled_dot_product_attention with a boolean mask built from segment ids), and the same function
as jaxsora.models.dit.DiT: one pack holds several independent examples, attention never crosses
segments, every segment has its own time and caption, conditioning tokens (`cond_mask`) are
modulated for t = 0, and an all-False caption mask is the null caption (the start token for
hashed ids, a learned `null` vector for a frozen encoder's embeddings), as in
jaxsora/models/text.py. Module names mirror the JAX model's, so a weight's name is its JAX path
with `kernel`/`embedding` -> `weight` (kernels transposed: nn.Linear stores [out, in]).

Depends on torch, numpy and safetensors only: no JAX, no other jaxsora module.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
START_ID = 1  # jaxsora.models.tokenizer.START_ID: hashed ids read the null caption as it


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """The fields of jaxsora.models.dit.DiTConfig that shape the weights or the function (the
    JAX-only execution fields, dtype/attention/remat/scan_layers, are not needed here)."""

    patch_dim: int
    width: int = 256
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    text_vocab: int = 4096
    text_len: int = 16
    text_width: int = 128
    text_depth: int = 2
    text_heads: int = 2
    text_embed_dim: int = 0  # > 0: captions are a frozen encoder's embeddings of this width
    rope_theta: float = 10_000.0
    frame_positions: bool = False  # fractional (h, w) sin-cos features on the patch embedding

    @classmethod
    def from_dict(cls, d: Mapping) -> DiTConfig:
        other = {k: d[k] for k, v in VIDEO_DIT_ONLY.items() if k in d and d[k] != v}
        if other:
            raise ValueError(
                f"this package runs jaxsora's caption-conditioned video DiT; the config has "
                f"{other} (an original-DiT model: load its --format diffusers export with "
                "diffusers.DiTTransformer2DModel)"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# jaxsora DiTConfig fields of its original-DiT configuration, at the values this package runs.
VIDEO_DIT_ONLY = {
    "num_classes": 0,
    "positions": "rope",
    "qk_norm": True,
    "learn_sigma": False,
    "time_freq_shift": 0,
    "mlp_norm_eps": 1e-6,
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.scale, eps=1e-6)


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free, eps 1e-6, like jaxsora.models.layers.layer_norm (adaLN scales it)."""
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


def axis_pairs(head_dim: int) -> tuple[int, int, int]:
    """RoPE rotation pairs for (t, h, w): a quarter for time, the rest split between sides."""
    pairs = head_dim // 2
    n_t = max(1, pairs // 4)
    n_h = (pairs - n_t) // 2
    return n_t, n_h, pairs - n_t - n_h


def rope_angles(positions_BL3: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """Rotation angles [B, L, head_dim // 2] of each token's (t, h, w) grid position."""
    parts = []
    for axis, n in enumerate(axis_pairs(head_dim)):
        freqs = theta ** (-torch.arange(n, dtype=torch.float32) / max(n, 1))
        parts.append(positions_BL3[..., axis : axis + 1].float() * freqs)
    return torch.cat(parts, dim=-1)


def apply_rope(x_BHLK: torch.Tensor, cos_B1LK2: torch.Tensor, sin_B1LK2: torch.Tensor):
    x1, x2 = x_BHLK.chunk(2, dim=-1)
    return torch.cat([x1 * cos_B1LK2 - x2 * sin_B1LK2, x1 * sin_B1LK2 + x2 * cos_B1LK2], dim=-1)


def segment_mask(seg_q_BL: torch.Tensor, seg_kv_BM: torch.Tensor) -> torch.Tensor:
    """[B, 1, L, M] bool, True where a query may attend to a key (same segment id)."""
    return (seg_q_BL[:, :, None] == seg_kv_BM[:, None, :])[:, None]


def frame_position_features(
    positions_BL3: torch.Tensor, segment_ids_BL: torch.Tensor, num_segments: int, dim: int
) -> torch.Tensor:
    """[B, L, dim]: each token's (h, w) as a fraction of its segment's frame, (p + 0.5) / size
    with the size read off the segment's own positions, as sin-cos features at frequencies
    pi, 2 pi, ..., (dim / 4) pi per axis (jaxsora.models.dit.frame_position_features)."""
    hw = positions_BL3[..., 1:].float()
    B, L, _ = hw.shape
    idx = segment_ids_BL.long()[..., None].expand(B, L, 2)
    extent = torch.full((B, num_segments + 1, 2), -torch.inf, dtype=hw.dtype)
    extent = extent.scatter_reduce(1, idx, hw, reduce="amax")
    size = torch.gather(extent, 1, idx) + 1.0
    frac = (hw + 0.5) / size.clamp_min(1.0)
    omega = math.pi * torch.arange(1, dim // 4 + 1, dtype=torch.float32)
    angles = frac[..., None] * omega
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1).reshape(B, L, dim)


def per_segment(values_BSF: torch.Tensor, segment_ids_BL: torch.Tensor) -> torch.Tensor:
    """[B, S, F] -> [B, L, F] by each token's segment (padding takes segment 1's)."""
    idx = (segment_ids_BL - 1).clamp_min(0).long()
    return torch.take_along_dim(values_BSF, idx[..., None], dim=1)


def conditioning_rows(segment_ids_BL, cond_mask_BL, num_segments: int) -> torch.Tensor:
    """The row of the [B, 2S] conditioning each token reads (1-based, for `per_segment`): its
    segment's t row, or its t = 0 row (S + k) when it is a clean conditioning token."""
    if cond_mask_BL is None:
        return segment_ids_BL
    clean = cond_mask_BL.bool() & (segment_ids_BL > 0)
    return segment_ids_BL + num_segments * clean.to(segment_ids_BL.dtype)


class Attention(nn.Module):
    def __init__(self, width: int, num_heads: int, kv_width: int | None = None):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, width // num_heads
        kv_width = kv_width or width
        self.q, self.k = nn.Linear(width, width), nn.Linear(kv_width, width)
        self.v, self.out = nn.Linear(kv_width, width), nn.Linear(width, width)
        self.q_norm, self.k_norm = RMSNorm(self.head_dim), RMSNorm(self.head_dim)

    def forward(self, x_BLD, kv_BMD, mask_B1LM, rope=None, has_key_B1L1=None):
        B, L, _ = x_BLD.shape
        M = kv_BMD.shape[1]
        H, K = self.num_heads, self.head_dim
        q = self.q_norm(self.q(x_BLD).view(B, L, H, K)).transpose(1, 2)
        k = self.k_norm(self.k(kv_BMD).view(B, M, H, K)).transpose(1, 2)
        v = self.v(kv_BMD).view(B, M, H, K).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_B1LM)
        if has_key_B1L1 is not None:
            # A query with no key at all (padding in cross-attention) outputs 0, as in jaxsora.
            # Self-attention needs no such guard: every token shares its own segment id.
            o = torch.where(has_key_B1L1, o, 0.0)
        return self.out(o.transpose(1, 2).reshape(B, L, H * K))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CaptionLayer(nn.Module):
    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.attn = Attention(width, num_heads)
        self.mlp = Mlp(width, 4 * width)

    def forward(self, x_NLD, mask_N1LL):
        h = layer_norm(x_NLD)
        x_NLD = x_NLD + self.attn(h, h, mask_N1LL)
        return x_NLD + self.mlp(layer_norm(x_NLD))


class CaptionEncoder(nn.Module):
    """Hashed ids (own embedding table and positions) or a frozen encoder's embeddings
    (`embed_dim` > 0: a projection and a learned null token), then a few bidirectional layers."""

    def __init__(
        self, vocab: int, text_len: int, width: int, depth: int, num_heads: int, embed_dim: int = 0
    ):
        super().__init__()
        self.embed_dim = embed_dim
        if embed_dim:
            self.project = nn.Linear(embed_dim, width)
            self.null = nn.Parameter(0.02 * torch.randn(embed_dim))
        else:
            self.embed = nn.Embedding(vocab, width)
            self.pos = nn.Parameter(0.02 * torch.randn(text_len, width))
        self.layers = nn.ModuleList([CaptionLayer(width, num_heads) for _ in range(depth)])

    def forward(self, text_BSL, mask_BSL):
        """-> tokens [B, S, Lt, D], masked-mean pooled [B, S, D], and the mask the tokens were
        read with (a null caption's one token added)."""
        B, S, Lt = mask_BSL.shape
        mask = mask_BSL.reshape(B * S, Lt).bool()
        null = (~mask.any(-1, keepdim=True)) & (torch.arange(Lt, device=mask.device) == 0)
        mask = mask | null
        if self.embed_dim:
            emb = text_BSL.reshape(B * S, Lt, self.embed_dim).float()
            x = self.project(torch.where(null[..., None], self.null, emb))
        else:
            ids = torch.where(null, START_ID, text_BSL.reshape(B * S, Lt).long())
            x = self.embed(ids) + self.pos[:Lt]
        seg = mask.int()
        attn_mask = segment_mask(seg, seg)
        for layer in self.layers:
            x = layer(x, attn_mask)
        x = layer_norm(x)
        w = mask[..., None].float()
        pooled = (x * w).sum(1) / w.sum(1).clamp_min(1.0)
        return x.reshape(B, S, Lt, -1), pooled.reshape(B, S, -1), mask.reshape(B, S, Lt)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = 1000.0 * t[..., None].float() * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x, shift, scale):
    return x * (1.0 + scale) + shift


class DiTBlock(nn.Module):
    def __init__(self, width: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.ada = nn.Linear(width, 6 * width)
        self.self_attn = Attention(width, num_heads)
        self.cross_attn = Attention(width, num_heads)
        self.mlp = Mlp(width, int(mlp_ratio * width))

    def forward(self, x, c_BKD, rows_BL, self_mask, rope, ctx_BMD, cross_mask, has_key):
        mod = per_segment(self.ada(F.silu(c_BKD)), rows_BL)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)
        h = modulate(layer_norm(x), shift1, scale1)
        x = x + gate1 * self.self_attn(h, h, self_mask, rope)
        x = x + self.cross_attn(layer_norm(x), ctx_BMD, cross_mask, has_key_B1L1=has_key)
        h = modulate(layer_norm(x), shift2, scale2)
        return x + gate2 * self.mlp(h)


class DiT(nn.Module):
    """jaxsora.models.dit.DiT: same names and shapes (nn.Linear stores the kernel transposed);
    `cfg` is a DiTConfig, or anything with its fields (jaxsora's own DiTConfig too)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        D = cfg.width
        self.patch_in = nn.Linear(cfg.patch_dim, D)
        self.time_mlp1 = nn.Linear(256, D)
        self.time_mlp2 = nn.Linear(D, D)
        self.captions = CaptionEncoder(
            cfg.text_vocab,
            cfg.text_len,
            cfg.text_width,
            cfg.text_depth,
            cfg.text_heads,
            embed_dim=getattr(cfg, "text_embed_dim", 0),
        )
        self.caption_pool = nn.Linear(cfg.text_width, D)
        self.caption_proj = nn.Linear(cfg.text_width, D)
        self.blocks = nn.ModuleList(
            [DiTBlock(D, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)]
        )
        self.final_ada = nn.Linear(D, 2 * D)
        self.patch_out = nn.Linear(D, cfg.patch_dim)
        for zero in [self.final_ada, self.patch_out, *(b.ada for b in self.blocks)]:
            nn.init.zeros_(zero.weight)  # adaLN-Zero, as in jaxsora
            nn.init.zeros_(zero.bias)

    def forward(
        self,
        x_BLP,
        t_BS,
        segment_ids_BL,
        positions_BL3,
        text_BSLt,
        text_mask_BSLt,
        cond_mask_BL=None,
    ):
        """Predicted velocity [B, L, P] of noisy patches at per-segment times t_BS. `text_BSLt`
        is caption ids [B, S, Lt] or embeddings [B, S, Lt, Dt]; `cond_mask_BL` marks clean
        conditioning tokens (seen at t = 0)."""
        cfg = self.cfg
        B, S, Lt = text_mask_BSLt.shape
        x = self.patch_in(x_BLP.float())
        if getattr(cfg, "frame_positions", False):
            x = x + frame_position_features(positions_BL3, segment_ids_BL, S, cfg.width)
        # Per-token time as in jaxsora: rows 0..S-1 at t, S..2S-1 at 0 for clean tokens.
        t_BK = torch.cat([t_BS, torch.zeros_like(t_BS)], dim=1)
        t_emb = self.time_mlp2(F.silu(self.time_mlp1(timestep_embedding(t_BK, 256))))
        text, pooled, text_mask = self.captions(text_BSLt, text_mask_BSLt)
        pooled = self.caption_pool(pooled)
        c = t_emb + torch.cat([pooled, pooled], dim=1)
        rows = conditioning_rows(segment_ids_BL, cond_mask_BL, S)
        ctx = self.caption_proj(text).reshape(B, S * Lt, -1)
        seg_of_caption = torch.arange(1, S + 1, dtype=segment_ids_BL.dtype)[None, :, None]
        ctx_seg = torch.where(text_mask, seg_of_caption, 0).reshape(B, S * Lt)
        # Masks and rotations are the same for every block: built once per forward.
        self_mask = segment_mask(segment_ids_BL, segment_ids_BL)
        cross_mask = segment_mask(segment_ids_BL, ctx_seg)
        has_key = cross_mask.any(-1, keepdim=True)
        angles = rope_angles(positions_BL3, cfg.width // cfg.num_heads, cfg.rope_theta)
        rope = (torch.cos(angles)[:, None], torch.sin(angles)[:, None])
        for block in self.blocks:
            x = block(x, c, rows, self_mask, rope, ctx, cross_mask, has_key)
        shift, scale = per_segment(self.final_ada(F.silu(c)), rows).chunk(2, dim=-1)
        return self.patch_out(modulate(layer_norm(x), shift, scale))


def count_params(torch_model: nn.Module) -> int:
    return sum(p.numel() for p in torch_model.parameters())


# ----------------------------------------------------------------------------- loading


def weight_files(folder: str) -> list[str]:
    """`model.safetensors`, or the shards `model.safetensors.index.json` names."""
    single, index = os.path.join(folder, SINGLE_FILE), os.path.join(folder, INDEX_FILE)
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return [os.path.join(folder, s) for s in sorted(set(weight_map.values()))]
    raise FileNotFoundError(
        f"{folder}: no {SINGLE_FILE} and no {INDEX_FILE}; export a run with "
        "jaxsora.export.dit.export_dit (python -m jaxsora.export export-dit)"
    )


def load_pretrained(folder: str, device: str | torch.device = "cpu") -> tuple[DiT, dict]:
    """(model in eval mode, the folder's config.json) from an `export_dit` folder.

    Strict: torch's `load_state_dict(strict=True)` lists every missing, unexpected and
    misshapen key at once; the error names the folder.
    """
    from safetensors.torch import load_file

    with open(os.path.join(folder, CONFIG_FILE)) as f:
        config = json.load(f)
    model = DiT(DiTConfig.from_dict(config))
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        state.update(load_file(path))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise RuntimeError(f"{folder}: the weights do not fit its config.json: {e}") from e
    return model.to(device).eval(), config
