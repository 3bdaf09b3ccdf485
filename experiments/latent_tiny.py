"""The tiny DiT in latent space: trained on cached VAE latents of the bundled synthetic clips,
sampled through the VAE's decoder.

    python -m jaxsora.train_vae --config experiments/vae_tiny.py --workdir runs/vae
    python -m data_pipelines.build --dataset latents:synthetic_clips --vae_dir runs/vae/vae \
        --data_dir data/tfds
    python -m jaxsora.train --config experiments/latent_tiny.py --workdir runs/latent
    python -m jaxsora.sample --workdir runs/latent --prompt "a red circle moving right on a blue \
        background" --frames 9 --height 64 --width 112

Everything not set here is `experiments/tiny.py`'s. One latent patch (1, 2, 2) covers 1 latent
frame (4 pixel frames, or frame 0 alone) x 16 x 16 pixels, and holds 2 * 2 * z_dim numbers: the
DiT's patch_dim follows the VAE's z_dim. The cache (`data_pipelines/latents`, config
`synthetic_clips`) sized every clip to at most 128 such patches; `data.max_tokens` matches it,
so nothing is cropped. `data.max_frames` counts pixel frames (17 = 5 latent frames).

Variants (comma-separated after a colon):
  runlocal     a few steps of a smaller model, for tests and smoke runs
  steps=N      train for N steps
  source=X     train on TFDS dataset X alone (e.g. latents/sample_media, latents/video_folder)
  vae_dir=DIR  the VAE the cache was built with and the sampler decodes with
"""

import ml_collections

from experiments import tiny


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = tiny.parse_arg(arg)
    passed = ",".join(f"{k}={v}" for k, v in args.items() if k in ("runlocal", "steps"))
    c = tiny.get_config(passed)
    c.model.compression = "vae"  # jaxsora/compression.py: LatentSpace
    c.model.vae_dir = args.get("vae_dir", "runs/vae/vae")  # <VAE workdir>/vae
    c.model.patch = (1, 2, 2)  # latent units: 1 latent frame x 16 x 16 pixels
    c.data.sources = [dict(name=args.get("source", "latents/synthetic_clips"), weight=1.0)]
    c.data.max_tokens = 128  # the cache's budget (data_pipelines/latents: max_tokens)
    # With a multi-resolution cache (latents/synthetic_clips_multires), each example draws one
    # of its clip's sizes within [min_tokens, max_tokens]; a single-size cache fixed them.
    c.data.min_tokens = 16
    c.data.max_frames = 17  # pixel frames: 1 + 4 * 4 -> 5 latent frames
    c.optim.lr = 1e-3  # what the README's latent-space numbers were measured with (tiny: 2e-3)
    return c
