"""The default CPU config of the causal video VAE: a small Wan-2.1-layout VAE (4x time, 8x
space, 16 latent channels) on the bundled synthetic clips and real videos/photos.

    python -m jaxsora.train_vae --config experiments/vae_tiny.py --workdir runs/vae

Variants (comma-separated after a colon):
  runlocal   a few steps of an even smaller VAE, for tests and smoke runs
  steps=N    train for N steps
  adv        add the adversarial (PatchGAN hinge) term after the first half of training
  onebucket  the first bucket only (tests: one train step to compile)
"""

import ml_collections

from experiments.tiny import parse_arg
from jaxsora.sharding import DEFAULT_RULES


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg)
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 2000
    c.stop_after = 0  # stop (with a checkpoint) after this step, schedule unchanged; 0 = never
    c.log_every = 25
    c.checkpoint_every = 500
    c.keep_checkpoints = 2
    # A damaged latest checkpoint gives way to the previous one (one warning; it moves to
    # checkpoints/corrupt/); True stops with an error instead (jaxsora/checkpointing.py).
    c.stop_on_damaged_checkpoint = False
    # Resuming with other optim.*, total_steps, batch_size or loss settings than the
    # checkpoint's is refused unless True (then logged); jaxsora/resume.py has the table.
    c.allow_schedule_change = False
    c.latent_stats_batches = 8  # batches whose posterior means give the per-channel statistics

    c.mesh = dict(data=-1, fsdp=1, context=1, tensor=1)
    c.sharding_rules = DEFAULT_RULES

    # Field names and meaning as diffusers' AutoencoderKLWan (jaxsora/models/vae.py).
    c.vae = ml_collections.ConfigDict()
    c.vae.base_dim = 16
    c.vae.z_dim = 16  # as Wan 2.1: 48x fewer numbers than pixels
    c.vae.dim_mult = (1, 2, 4, 4)
    c.vae.num_res_blocks = 1
    c.vae.attn_scales = ()
    c.vae.temporal_downsample = (False, True, True)
    c.vae.dtype = "float32"

    c.data = ml_collections.ConfigDict()
    c.data.data_dir = "data/tfds"
    c.data.sources = [
        dict(name="synthetic_clips", weight=0.7),
        dict(name="sample_media", weight=0.3),
    ]
    # Each step takes the next bucket: a few fixed shapes (one compile each), several aspect
    # ratios and durations, videos and images (one-frame videos) in every batch.
    c.data.buckets = [
        dict(frames=9, height=32, width=32, videos=2, images=4),
        dict(frames=5, height=32, width=48, videos=2, images=4),
        dict(frames=5, height=48, width=32, videos=2, images=4),
    ]
    c.data.max_bad_fraction = 0.05
    c.data.max_scale = 1.0
    c.data.prefetch = 2  # batches decoded ahead of the step in a background thread; 0 = off

    c.loss = ml_collections.ConfigDict()
    c.loss.l1 = 1.0
    c.loss.ssim = 0.5  # weight of (1 - SSIM): see jaxsora/vae_losses.py for why SSIM
    c.loss.kl = 1e-4  # per latent element
    c.loss.adversarial_weight = 0.0  # > 0 turns on the PatchGAN hinge term
    c.loss.adversarial_start = 0  # step from which the generator sees the adversarial term
    c.loss.disc_width = 16

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 3e-4
    c.optim.warmup_steps = 25
    c.optim.weight_decay = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.99
    c.optim.grad_clip = 1.0
    c.optim.ema_decay = 0.99

    c.eval = ml_collections.ConfigDict()
    c.eval.enabled = True  # PSNR/SSIM on sample_media's held-out split at the end of training
    c.eval.frames = 9
    c.eval.max_side = 128

    if "steps" in args:
        c.total_steps = int(args["steps"])
    if "adv" in args:
        c.loss.adversarial_weight = 0.1
        c.loss.adversarial_start = c.total_steps // 2
    if "runlocal" in args:
        c.total_steps = int(args.get("steps", 4))
        c.log_every = 1
        c.checkpoint_every = 2
        c.latent_stats_batches = 1
        c.vae.base_dim, c.vae.z_dim, c.vae.dim_mult = 4, 4, (1, 2, 2, 2)
        c.data.sources = [dict(name="synthetic_clips/small", weight=1.0)]
        c.data.buckets = [
            dict(frames=5, height=16, width=24, videos=2, images=2),
            dict(frames=1, height=24, width=16, videos=0, images=2),
        ]
        c.eval.enabled = False
    if "onebucket" in args:  # one compiled step: a batch is a pure function of its step anyway
        c.data.buckets = c.data.buckets[:1]
    return c
