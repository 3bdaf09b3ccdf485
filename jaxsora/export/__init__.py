"""Checkpoint conversion: jaxsora's models in and out of other frameworks' layouts, one module
per model family, on one strict-table machinery.

  tables.py   safetensors files in (single or sharded, pickles refused) and the strict key/shape
              check: every missing, unexpected and misshapen key reported at once
  vae.py      the video VAE <-> diffusers `AutoencoderKLWan`
  dit.py      the DiT <-> safetensors in PyTorch conventions (sharded above a size, streamed
              from the checkpoint leaf by leaf), and back to a jaxsora run directory
  torch_dit/  a self-contained PyTorch package (torch, numpy, safetensors only) that loads an
              exported DiT and runs its packed forward pass and sampler
  stablehlo.py the denoiser as a `jax.export` artifact, polymorphic in packs and tokens,
              callable without the model code
  __main__.py the command line: `python -m jaxsora.export import-vae | export-vae | export-dit |
              import-dit`

The frozen text encoders (jaxsora/text/) load their Hugging Face checkpoints through tables.py;
the VAE's own directory format is jaxsora/vae_dir.py.
"""
