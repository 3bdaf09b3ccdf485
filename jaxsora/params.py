"""Parameter count and FLOPs per token of a config's DiT, without allocating it.

    python -m jaxsora.params --config experiments/dit_video.py:size=XL [--channels 16]

The model is built abstractly (`nnx.eval_shape`: shapes only, no FLOPs, no memory), so the 3B
configuration is counted on a laptop. FLOPs are jaxsora/flops.py's model FLOPs (matmuls, 2 per
multiply-add) for one segment of `data.max_tokens` tokens with a full caption: the forward
pass per token, and a train step per token (forward + backward, no remat). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os

from jaxsora import flops


def param_counts(cfg) -> dict[str, int]:
    """{top-level module: parameters} of the DiT `cfg` builds, abstractly; "total" included."""
    from flax import nnx

    from jaxsora.models.dit import make_model

    abstract = nnx.eval_shape(lambda: make_model(cfg, 0))
    counts: dict[str, int] = {}
    for path, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        counts[str(path[0])] = counts.get(str(path[0]), 0) + math.prod(v.shape)
    counts["total"] = sum(counts.values())
    return counts


def per_token_flops(cfg, tokens: int, caption_tokens: int) -> dict[str, float]:
    """Model FLOPs per token of one segment of `tokens` tokens and `caption_tokens` caption
    tokens: the forward pass, and a train step (jaxsora/flops.py's count)."""
    work = flops.Work(
        tokens=float(tokens),
        segments=1.0,
        caption_tokens=float(caption_tokens),
        self_pairs=float(tokens * tokens),
        cross_pairs=float(tokens * caption_tokens),
        caption_pairs=float(caption_tokens * caption_tokens),
    )
    forward = sum(flops.forward_parts(cfg, work).values())
    return {"forward": forward / tokens, "train_step": flops.step_flops(cfg, work) / tokens}


def dit_config_of(config, channels: int | None = None):
    """The run's DiTConfig; `channels` stands in for a latent stage that is not on this disk."""
    from jaxsora import train as trainer

    if channels is None:
        return trainer.dit_config(config)
    config = config.copy_and_resolve_references()
    config.model.compression = "pixels"  # the DiT's shapes need only the channel count
    cfg = trainer.dit_config(config)
    pt, ph, pw = config.model.patch
    return dataclasses.replace(cfg, patch_dim=pt * ph * pw * channels)


def summary(config, channels: int | None = None) -> dict:
    cfg = dit_config_of(config, channels)
    counts = param_counts(cfg)
    d = config.data
    caption = 1 if cfg.num_classes else config.model.text_len
    return {
        "params": counts["total"],
        "params_by_module": {k: v for k, v in counts.items() if k != "total"},
        "width": cfg.width,
        "depth": cfg.depth,
        "heads": cfg.num_heads,
        "patch_dim": cfg.patch_dim,
        "flops_per_token": per_token_flops(cfg, d.max_tokens, caption),
        "at_tokens": d.max_tokens,
        "mesh": dict(config.mesh),
        "suggested_chips": config.get("suggested_chips"),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jaxsora.params", description=__doc__)
    parser.add_argument("--config", required=True, help="path/to/config.py[:args]")
    parser.add_argument(
        "--channels",
        type=int,
        default=None,
        help="latent channels (the VAE's z_dim) when model.vae_dir is not on this disk",
    )
    args = parser.parse_args(argv)
    from jaxsora.config_files import load_config

    config = load_config(args.config)
    vae_dir = config.model.get("vae_dir")
    channels = args.channels
    if channels is None and config.model.compression == "vae" and not os.path.isdir(vae_dir):
        raise SystemExit(
            f"error: model.vae_dir={vae_dir!r} is not on this disk: pass --channels (its z_dim, "
            "e.g. 16 for Wan 2.1's VAE)"
        )
    print(json.dumps({"config": args.config, **summary(config, channels)}))


if __name__ == "__main__":
    main()
