"""A plain PyTorch port of jaxsora's packed DiT and its rectified-flow train step: the peer that
benchmarks/torch_peer.py times against the JAX step.

It is written the way a PyTorch user would write it (nn.Linear, F.layer_norm, F.rms_norm,
F.scaled_dot_product_attention with a boolean mask built from segment ids, torch.optim.AdamW,
clip_grad_norm_) and it is the same model: module names mirror jaxsora.models.dit so
`load_jax_params` copies every weight by name, and `check_parity` asserts that both forwards
agree on one pack. Importing this module has no side effects beyond importing torch.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PARITY_TOL = 1e-4


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
    pairs = head_dim // 2
    n_t = max(1, pairs // 4)
    n_h = (pairs - n_t) // 2
    return n_t, n_h, pairs - n_t - n_h


def rope_angles(positions_BL3: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
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


class Attention(nn.Module):
    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, width // num_heads
        self.q, self.k = nn.Linear(width, width), nn.Linear(width, width)
        self.v, self.out = nn.Linear(width, width), nn.Linear(width, width)
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
    def __init__(self, vocab: int, text_len: int, width: int, depth: int, num_heads: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(0.02 * torch.randn(text_len, width))
        self.layers = nn.ModuleList([CaptionLayer(width, num_heads) for _ in range(depth)])

    def forward(self, ids_BSL, mask_BSL):
        B, S, Lt = ids_BSL.shape
        ids, mask = ids_BSL.reshape(B * S, Lt), mask_BSL.reshape(B * S, Lt)
        x = self.embed(ids) + self.pos[:Lt]
        seg = mask.int()
        attn_mask = segment_mask(seg, seg)
        for layer in self.layers:
            x = layer(x, attn_mask)
        x = layer_norm(x)
        w = mask[..., None].float()
        pooled = (x * w).sum(1) / w.sum(1).clamp_min(1.0)
        return x.reshape(B, S, Lt, -1), pooled.reshape(B, S, -1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = 1000.0 * t[..., None].float() * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def per_segment(values_BSF: torch.Tensor, segment_ids_BL: torch.Tensor) -> torch.Tensor:
    """[B, S, F] -> [B, L, F] by each token's segment (padding takes segment 1's)."""
    idx = (segment_ids_BL - 1).clamp_min(0).long()
    return torch.take_along_dim(values_BSF, idx[..., None], dim=1)


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
    """jaxsora.models.dit.DiT, same names and shapes (nn.Linear stores kernel transposed)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        D = cfg.width
        self.patch_in = nn.Linear(cfg.patch_dim, D)
        self.time_mlp1 = nn.Linear(256, D)
        self.time_mlp2 = nn.Linear(D, D)
        self.captions = CaptionEncoder(
            cfg.text_vocab, cfg.text_len, cfg.text_width, cfg.text_depth, cfg.text_heads
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
        text_ids_BSLt,
        text_mask_BSLt,
        cond_mask_BL=None,
    ):
        cfg = self.cfg
        B, S, Lt = text_ids_BSLt.shape
        x = self.patch_in(x_BLP)
        # Per-token time as in jaxsora: rows 0..S-1 at t, S..2S-1 at 0 for clean tokens.
        t_BK = torch.cat([t_BS, torch.zeros_like(t_BS)], dim=1)
        t_emb = self.time_mlp2(F.silu(self.time_mlp1(timestep_embedding(t_BK, 256))))
        text, pooled = self.captions(text_ids_BSLt, text_mask_BSLt)
        pooled = self.caption_pool(pooled)
        c = t_emb + torch.cat([pooled, pooled], dim=1)
        rows = segment_ids_BL
        if cond_mask_BL is not None:
            rows = rows + S * (cond_mask_BL & (segment_ids_BL > 0)).to(rows.dtype)
        ctx = self.caption_proj(text).reshape(B, S * Lt, -1)
        seg_of_caption = torch.arange(1, S + 1, dtype=torch.int32)[None, :, None]
        ctx_seg = torch.where(text_mask_BSLt, seg_of_caption, 0).reshape(B, S * Lt)
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


# ----------------------------------------------------------------------------- weights from JAX


def jax_params(jax_model) -> dict[str, np.ndarray]:
    """'blocks.0.ada.kernel' -> array, from nnx.state(model, nnx.Param)."""
    from flax import nnx

    return named_arrays(nnx.state(jax_model, nnx.Param).to_pure_dict())


def named_arrays(pure: dict) -> dict[str, np.ndarray]:
    """Dotted names for a pure dict of the DiT's parameters (or of their gradients)."""
    import jax

    out = {}
    for path, value in jax.tree_util.tree_flatten_with_path(pure)[0]:
        keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        value = np.asarray(value)
        if keys[0] == "blocks" and not keys[1].isdigit():
            # Scanned blocks (DiTConfig.scan_layers): one array per weight, layers stacked first.
            for i, layer in enumerate(value):
                out[".".join(["blocks", str(i), *keys[1:]])] = layer
        else:
            out[".".join(keys)] = value
    return out


def torch_name(jax_name: str) -> tuple[str, bool]:
    """(torch parameter name, whether the array is transposed on the way)."""
    head, _, leaf = jax_name.rpartition(".")
    if leaf == "kernel":
        return f"{head}.weight", True
    if leaf == "embedding":
        return f"{head}.weight", False
    return jax_name, False  # bias, scale (RMSNorm), pos


def load_jax_params(torch_model: DiT, jax_model) -> None:
    """Copies every JAX parameter into the torch model; a missing, extra or misshapen name fails,
    so a passing parity check cannot come from a weight left at its torch init."""
    own = dict(torch_model.named_parameters())
    seen = set()
    with torch.no_grad():
        for name, value in jax_params(jax_model).items():
            tname, transpose = torch_name(name)
            if tname not in own:
                raise KeyError(f"JAX parameter {name} has no torch counterpart {tname}")
            value = value.T if transpose else value
            if tuple(own[tname].shape) != value.shape:
                raise ValueError(f"{name}: JAX {value.shape} vs torch {tuple(own[tname].shape)}")
            own[tname].copy_(torch.from_numpy(np.array(value, copy=True)))
            seen.add(tname)
    missing = set(own) - seen
    if missing:
        raise KeyError(f"torch parameters not set from JAX: {sorted(missing)}")


def from_jax(jax_model) -> DiT:
    model = DiT(jax_model.cfg)
    load_jax_params(model, jax_model)
    return model


def count_params(torch_model: nn.Module) -> int:
    return sum(p.numel() for p in torch_model.parameters())


# ----------------------------------------------------------------------------- parity


def to_torch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in batch.items()}


def randomize(jax_model, seed: int = 1, scale: float = 0.05) -> None:
    """Adds noise to every JAX weight (in place): adaLN-Zero layers start at zero, which would
    make both outputs exactly 0 and a parity check vacuous. The default scale keeps outputs O(1),
    where float32 rounding (~1e-6 relative) stays well under an absolute tolerance of 1e-4."""
    import jax
    from flax import nnx

    params = nnx.state(jax_model, nnx.Param)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    nnx.update(jax_model, jax.tree.unflatten(tree, noisy))


def check_parity(
    jax_model, batch: dict[str, np.ndarray], seed: int = 0, tol: float = PARITY_TOL
) -> float:
    """Max |torch - JAX| of the DiT forward on one batch of packs, float32; raises over `tol`.

    Copies `jax_model`'s weights into a fresh torch DiT, draws per-segment times, and runs both
    on the pack's tokens. Use a float32 model with non-zero adaLN weights (see `randomize`).
    """
    import jax.numpy as jnp
    from flax import nnx

    rng = np.random.default_rng(seed)
    B, S = batch["grid"].shape[:2]
    t = rng.uniform(0.05, 0.95, (B, S)).astype(np.float32)
    inputs = [
        batch["tokens"],
        t,
        batch["segment_ids"],
        batch["positions"],
        batch["text_ids"],
        batch["text_mask"],
        batch["cond_mask"],
    ]
    want = np.asarray(nnx.jit(lambda m, *x: m(*x))(jax_model, *(jnp.asarray(x) for x in inputs)))
    if not np.abs(want).max() > 1e-3:
        raise ValueError("the JAX output is ~0 (adaLN-Zero init?): randomize() the model first")
    model = from_jax(jax_model).eval()
    with torch.no_grad():
        got = model(*(torch.from_numpy(np.array(x, copy=True)) for x in inputs)).numpy()
    diff = float(np.abs(got - want).max())
    if not diff < tol:
        raise AssertionError(f"torch DiT differs from the JAX DiT by {diff:.3g} (tol {tol})")
    return diff


def check_grad_parity(
    jax_model, batch: dict[str, np.ndarray], flow_cfg, seed: int = 0, tol: float = 1e-3
) -> float:
    """Max |torch - JAX| of the loss gradients w.r.t. every weight, relative to the largest
    gradient; raises over `tol`. Both sides see the same noised inputs (times, noise and caption
    dropout drawn once), so this checks the backward pass and the packed loss, not the RNGs."""
    import jax.numpy as jnp
    from flax import nnx

    from jaxsora.diffusion import flow

    model = from_jax(jax_model)
    tb = to_torch(batch)
    gen = torch.Generator().manual_seed(seed)
    B, S = batch["grid"].shape[:2]
    drop = torch.rand(B, S, generator=gen) < 0.3  # some dropped captions, whatever the config
    x_t, t_BS, text_mask, target = flow_inputs(tb, flow_cfg, gen, drop=drop)
    model_inputs = (
        x_t,
        t_BS,
        tb["segment_ids"],
        tb["positions"],
        tb["text_ids"],
        text_mask,
        tb["cond_mask"],
    )
    loss = packed_loss(model(*model_inputs), target, tb["segment_ids"], tb["cond_mask"], S)
    loss.backward()
    got = {name: p.grad.numpy() for name, p in model.named_parameters()}

    inputs = [jnp.asarray(x.numpy()) for x in model_inputs]

    def jax_loss(m):
        return flow.packed_loss(
            m(*inputs), jnp.asarray(target.numpy()), inputs[2], jnp.asarray(batch["cond_mask"]), S
        )[0]

    grads = named_arrays(nnx.jit(nnx.grad(jax_loss))(jax_model).to_pure_dict())
    scale = max(float(np.abs(g).max()) for g in grads.values())
    diff = 0.0
    for name, g in grads.items():
        tname, transpose = torch_name(name)
        diff = max(diff, float(np.abs((g.T if transpose else g) - got[tname]).max()) / scale)
    if not diff < tol:
        raise AssertionError(
            f"torch gradients differ from JAX's by {diff:.3g} of the largest gradient (tol {tol})"
        )
    return diff


# ----------------------------------------------------------------------------- train step


def packed_loss(pred, target, segment_ids, cond_mask, max_segments: int):
    """Per-segment mean squared error, then the mean over segments (jaxsora's default)."""
    err = (pred - target).square().mean(-1)
    live = (segment_ids > 0) & ~cond_mask
    onehot = F.one_hot((segment_ids - 1).clamp_min(0).long(), max_segments).float()
    onehot = onehot * live[..., None]
    count = onehot.sum(1)
    seg_sum = torch.einsum("bl,bls->bs", torch.where(live, err, 0.0), onehot)
    has = count > 0
    seg_loss = seg_sum / count.clamp_min(1.0)
    return torch.where(has, seg_loss, 0.0).sum() / has.sum().clamp_min(1)


def flow_inputs(batch, flow_cfg, generator: torch.Generator, t_BS=None, noise=None, drop=None):
    """Rectified-flow noising per segment: logit-normal t, resolution shift, caption dropout."""
    seg, grid, x0 = batch["segment_ids"], batch["grid"], batch["tokens"]
    B, S = grid.shape[:2]
    if t_BS is None:
        z = torch.randn(B, S, generator=generator)
        t_BS = torch.sigmoid(flow_cfg.time_mean + flow_cfg.time_std * z)
        tokens = grid.prod(-1).float()
        shift = torch.sqrt(tokens.clamp_min(flow_cfg.base_tokens) / flow_cfg.base_tokens)
        t_BS = shift * t_BS / (1.0 + (shift - 1.0) * t_BS)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator)
    if drop is None:
        drop = torch.rand(B, S, generator=generator) < flow_cfg.caption_dropout
    t_tok = per_segment(t_BS[..., None], seg)
    x_t = (1.0 - t_tok) * x0 + t_tok * noise
    x_t = torch.where(batch["cond_mask"][..., None], x0, x_t)
    null = torch.zeros_like(batch["text_mask"])
    null[..., 0] = True
    text_mask = torch.where(drop[..., None], null, batch["text_mask"])
    return x_t, t_BS, text_mask, noise - x0


def loss_fn(model: DiT, batch, flow_cfg, generator, **fixed):
    x_t, t_BS, text_mask, target = flow_inputs(batch, flow_cfg, generator, **fixed)
    pred = model(
        x_t,
        t_BS,
        batch["segment_ids"],
        batch["positions"],
        batch["text_ids"],
        text_mask,
        batch["cond_mask"],
    )
    return packed_loss(
        pred, target, batch["segment_ids"], batch["cond_mask"], batch["grid"].shape[1]
    )


class TrainStep:
    """Forward, backward, clip, AdamW, EMA: the same work as jaxsora.train.train_step."""

    def __init__(self, model: DiT, config, fused_adamw: bool = False, compile_model=None):
        o = config.optim
        self.model, self.config = model, config
        self.forward_model = model if compile_model is None else compile_model
        self.params = [p for p in model.parameters()]
        self.ema = [p.detach().clone() for p in self.params]
        self.opt = torch.optim.AdamW(
            self.params,
            lr=o.lr,
            betas=(o.b1, o.b2),
            eps=1e-8,
            weight_decay=o.weight_decay,
            **({"fused": True} if fused_adamw else {}),
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self._schedule)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step = 0

    def _schedule(self, step: int) -> float:
        """optax.warmup_cosine_decay_schedule(0, lr, warmup, total, 0.1 lr) as a factor of lr."""
        o = self.config.optim
        total = max(self.config.total_steps, o.warmup_steps + 1)
        if step < o.warmup_steps:
            return step / o.warmup_steps
        frac = min((step - o.warmup_steps) / (total - o.warmup_steps), 1.0)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    def __call__(self, batch: dict[str, torch.Tensor]) -> float:
        loss = loss_fn(self.forward_model, batch, self.config.flow, self.generator)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.config.optim.grad_clip)
        self.opt.step()
        self.sched.step()
        decay = min(self.config.optim.ema_decay, (1.0 + self.step) / (10.0 + self.step))
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, self.params, 1.0 - decay)
        self.step += 1
        return float(loss.detach())
