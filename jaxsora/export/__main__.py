"""The command line of jaxsora's checkpoint conversion (see jaxsora/export/__init__.py).

  python -m jaxsora.export import-vae --safetensors diffusion_pytorch_model.safetensors \
      --diffusers_config config.json --out runs/wan21_vae
  python -m jaxsora.export export-vae --vae_dir runs/wan21_vae --out vae.safetensors
  python -m jaxsora.export export-vae --vae_dir runs/wan21_vae --out hf_vae/  # + config.json,
      # loadable with diffusers.AutoencoderKLWan.from_pretrained("hf_vae")
  python -m jaxsora.export export-dit --workdir runs/default --format safetensors --out dit/
  python -m jaxsora.export export-dit --workdir runs/default --format torch --out dit_torch/
      # + the PyTorch package torch_dit/ that loads and samples it without jaxsora
  python -m jaxsora.export export-dit --workdir runs/default --format stablehlo --out dit_hlo/
  python -m jaxsora.export export-dit --workdir runs/dit_image --format diffusers --out dit_hf/
      # an original-DiT run (experiments/dit_image.py) -> DiTTransformer2DModel.from_pretrained
  python -m jaxsora.export import-dit --src dit/ --out runs/imported  # train or sample it
  python -m jaxsora.export import-dit --src dit_hf/ --out runs/from_diffusers \
      [--config experiments/dit_image.py]  # a diffusers DiT: the run config to train it with
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from absl import logging

from jaxsora.export.vae import (
    DIFFUSERS_WEIGHTS_FILE,
    load_safetensors_vae,
    save_safetensors_vae,
    vae_config_from_diffusers,
    vae_config_to_diffusers,
)
from jaxsora.vae_dir import PARAMS_DIR, config_summary, load_vae_dir, save_vae_dir


def _import_vae(args) -> None:
    if os.path.exists(os.path.join(args.out, PARAMS_DIR)):  # before reading a large file
        raise ValueError(f"{args.out} already holds a VAE: choose another --out or delete it")
    if args.diffusers_config:
        with open(args.diffusers_config) as f:
            cfg, mean, std = vae_config_from_diffusers(json.load(f), source=args.diffusers_config)
    else:
        print("no --diffusers_config: assuming the released Wan 2.1 VAE's config")
        cfg, mean, std = vae_config_from_diffusers({}, source="diffusers' defaults")
    model = load_safetensors_vae(args.safetensors, cfg)
    save_vae_dir(model, (mean, std), args.out)
    print(f"imported {args.safetensors} ({config_summary(cfg)}) into {args.out}")


def _export_vae(args) -> None:
    model, mean, std = load_vae_dir(args.vae_dir)
    out = args.out
    if out.endswith(".safetensors"):
        save_safetensors_vae(model, out)
    else:  # a diffusers model folder: AutoencoderKLWan.from_pretrained(out)
        os.makedirs(out, exist_ok=True)
        save_safetensors_vae(model, os.path.join(out, DIFFUSERS_WEIGHTS_FILE))
        if mean is None:
            logging.warning(
                "%s has no latents_mean/std: config.json gets diffusers' defaults (Wan 2.1's), "
                "which do not fit another VAE's latents",
                args.vae_dir,
            )
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(vae_config_to_diffusers(model.cfg, mean, std), f, indent=2)
            f.write("\n")
    print(f"exported {args.vae_dir} to {out}")


DIT_FORMATS = ("safetensors", "torch", "stablehlo", "diffusers")


def _export_dit(args) -> None:
    if args.format == "stablehlo":
        from jaxsora.export.stablehlo import export_run_stablehlo

        if args.step is not None:
            raise ValueError("--format stablehlo exports the latest checkpoint: drop --step")

        summary = export_run_stablehlo(args.workdir, args.out, use_ema=args.ema)
    elif args.format == "diffusers":
        from jaxsora.export.diffusers_dit import export_diffusers

        summary = export_diffusers(
            args.workdir,
            args.out,
            step=args.step,
            use_ema=args.ema,
            sample_size=args.sample_size,
        )
    else:
        from jaxsora.export.dit import export_dit

        summary = export_dit(
            args.workdir,
            args.out,
            step=args.step,
            use_ema=args.ema,
            for_torch_package=args.format == "torch",
        )
        if args.format == "torch":  # the weights plus the package that runs them
            import shutil

            package = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_dit")
            shutil.copytree(
                package,
                os.path.join(args.out, "torch_dit"),
                dirs_exist_ok=True,
                ignore=shutil.ignore_patterns("__pycache__"),
            )
    print(json.dumps({"exported": args.workdir, "format": args.format, "out": args.out, **summary}))


def _import_dit(args) -> None:
    from jaxsora.config_files import load_config
    from jaxsora.export import diffusers_dit
    from jaxsora.export.dit import import_dit

    config = load_config(args.config) if args.config else None
    if diffusers_dit.is_diffusers_dit(args.src):
        step = diffusers_dit.import_diffusers(args.src, args.out, config=config)
    else:
        step = import_dit(args.src, args.out, config=config)
    print(f"imported {args.src} into {args.out} (checkpoint {step})")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m jaxsora.export", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("import-vae", help="diffusers AutoencoderKLWan .safetensors -> VAE dir")
    p.add_argument("--safetensors", required=True, help="diffusers VAE weights file")
    p.add_argument(
        "--diffusers_config", help="its config.json (default: the released Wan 2.1 VAE's)"
    )
    p.add_argument("--out", required=True, help="VAE directory to write (must not exist)")
    p.set_defaults(run=_import_vae)
    p = sub.add_parser("export-vae", help="VAE dir -> diffusers AutoencoderKLWan weights")
    p.add_argument("--vae_dir", required=True, help="a VAE directory (import-vae, VAE trainer)")
    p.add_argument(
        "--out",
        required=True,
        help="F.safetensors, or a folder for diffusers' from_pretrained (weights + config.json)",
    )
    p.set_defaults(run=_export_vae)
    p = sub.add_parser("export-dit", help="a training run's DiT -> safetensors / torch / stablehlo")
    p.add_argument("--workdir", required=True, help="the run (its latest checkpoint is read)")
    p.add_argument("--step", type=int, default=None, help="a checkpoint step (default: latest)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--format", choices=DIT_FORMATS, default="safetensors")
    p.add_argument(
        "--sample_size",
        type=int,
        default=None,
        help="diffusers: config.json sample_size in latent pixels (default: about the run's "
        "largest example)",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(run=_export_dit)
    p = sub.add_parser("import-dit", help="an exported DiT folder -> a jaxsora run directory")
    p.add_argument(
        "--src",
        required=True,
        help="an exported folder (config.json + model*.safetensors) or a diffusers "
        "DiTTransformer2DModel folder",
    )
    p.add_argument("--out", required=True, help="run directory to write (train or sample it)")
    p.add_argument(
        "--config",
        default=None,
        help="the run config to build around the weights, e.g. experiments/dit_image.py[:args] "
        "(default: the exported run's own)",
    )
    p.set_defaults(run=_import_dit)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except ValueError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
