"""The PyTorch peer of jaxsora's packed DiT and its rectified-flow train step, which
benchmarks/torch_peer.py times against the JAX step.

The model itself is jaxsora/export/torch_dit (the self-contained PyTorch package the DiT export
ships with, written the way a PyTorch user would write it: nn.Linear, F.layer_norm, F.rms_norm,
F.scaled_dot_product_attention with a boolean mask built from segment ids); this file adds what
only the benchmark needs: copying a live JAX model's weights in by name (`load_jax_params`),
forward and gradient parity checks, and a train step (torch.optim.AdamW, clip_grad_norm_, EMA).
Importing this module has no side effects beyond importing torch.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from jaxsora.export.torch_dit.model import DiT, count_params, per_segment

__all__ = ["DiT", "count_params", "per_segment"]  # the model, re-exported for torch_peer.py

PARITY_TOL = 1e-4


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
    # Padding tokens' outputs depend on the attention backend (windowed gives 0, dense lets
    # padding attend padding) and are never used: compare the real tokens.
    real = (batch["segment_ids"] > 0)[..., None]
    diff = float(np.abs(np.where(real, got - want, 0.0)).max())
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
