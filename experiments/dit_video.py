"""The video DiT family over VAE latents: the DiT paper's S, B, L and XL widths, depths and heads,
and a ~3B model (the size commonly estimated for Sora), each with a TPU mesh to start from.

    python -m jaxsora.params --config experiments/dit_video.py:size=XL   # size, FLOPs/token
    python -m jaxsora.train --config experiments/dit_video.py:size=B,patch=2 --workdir runs/b

Variants (comma-separated after a colon):
  size=S|B|L|XL|3B   the model (default B)
  patch=1|2|4        the spatial patch in latent units, (1, p, p) (default 2, DiT's /2)
  runlocal           pixel space, a width-32 model and small packs: the same code on a laptop
  vae_dir=DIR        the VAE whose latents the data holds (default runs/vae/vae)

The meshes are starting points for a TPU v5p pod slice of the suggested size (`chips`): fsdp
grows with the parameter count so that weights, gradients and AdamW state (16 bytes/parameter)
fit in HBM with room for activations; the 3B model also splits its heads over `tensor`. Set
`mesh.data=-1` to take the rest of the slice as data parallelism. Everything not set here is
experiments/tiny.py's.
"""

import ml_collections

from experiments import tiny

# size: (width, depth, heads, mesh, chips)
SIZES = {
    "S": (384, 12, 6, dict(data=-1, fsdp=1, context=1, tensor=1), 8),
    "B": (768, 12, 12, dict(data=-1, fsdp=4, context=1, tensor=1), 16),
    "L": (1024, 24, 16, dict(data=-1, fsdp=8, context=1, tensor=1), 32),
    "XL": (1152, 28, 16, dict(data=-1, fsdp=16, context=1, tensor=1), 64),
    "3B": (2048, 32, 16, dict(data=-1, fsdp=32, context=1, tensor=4), 256),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = tiny.parse_arg(arg)
    size = args.get("size", "B")
    if size not in SIZES:
        raise ValueError(f"experiments/dit_video.py: size={size!r} is not one of {list(SIZES)}")
    patch = int(args.get("patch", 2))
    if patch not in (1, 2, 4):
        raise ValueError(f"experiments/dit_video.py: patch={patch} is not one of 1, 2, 4")
    width, depth, heads, mesh, chips = SIZES[size]
    c = tiny.get_config(",".join(f"{k}={v}" for k, v in args.items() if k == "steps"))
    c.suggested_chips = chips  # TPU v5p chips the mesh was sized for
    c.total_steps = int(args.get("steps", 400_000))
    c.batch_size = 256
    c.log_every, c.checkpoint_every = 100, 2000
    c.mesh = mesh
    c.strict_sharding = True  # on a pod, an fsdp split that saves nothing is a config error
    m = c.model
    m.compression, m.vae_dir = "vae", args.get("vae_dir", "runs/vae/vae")
    m.patch = (1, patch, patch)
    m.width, m.depth, m.num_heads = width, depth, heads
    m.text_vocab, m.text_len = 32_768, 64
    m.text_width, m.text_depth, m.text_heads = min(width, 768), 2, heads if width < 768 else 12
    m.rope_theta = 10_000.0
    m.dtype = "bfloat16"
    m.attention = "splash"  # TPU; "xla" on CPU and GPU
    m.remat = "dots" if size in ("S", "B") else "full"
    m.scan_layers = True  # one compiled block at any depth
    d = c.data
    d.sources = [dict(name="latents/video_folder", weight=1.0)]
    d.seq_len, d.max_segments = 8192, 64
    d.min_tokens, d.max_tokens = 256, 4096
    d.max_frames = 65  # pixel frames: 1 + 4 * 16 -> 17 latent frames
    d.buffer_size = 512
    c.optim.lr, c.optim.warmup_steps, c.optim.ema_decay = 1e-4, 5000, 0.9999
    c.flow.base_tokens = 1024
    c.sample.seq_len = 8192
    c.eval.quality_every = 0  # the analyzer reads captioned synthetic clips only
    if "runlocal" in args:  # the same model code at laptop scale, in pixel space
        c.total_steps = int(args.get("steps", 6))
        c.batch_size, c.log_every, c.checkpoint_every = 2, 2, 3
        c.mesh = dict(data=-1, fsdp=1, context=1, tensor=1)
        c.strict_sharding = False
        m.compression = "pixels"
        m.patch = (1, 4, 4)
        m.width, m.depth, m.num_heads = 32, 2, 2
        m.text_vocab, m.text_len, m.text_width, m.text_depth, m.text_heads = 2048, 16, 32, 1, 2
        m.dtype, m.attention, m.remat = "float32", "xla", "none"
        d.sources = [dict(name="synthetic_clips", weight=1.0)]
        d.seq_len, d.max_segments, d.min_tokens, d.max_tokens = 256, 16, 16, 128
        d.max_frames, d.buffer_size = 4, 16
        c.flow.base_tokens = 64
        c.sample.steps, c.sample.seq_len = 4, 256
    return c
