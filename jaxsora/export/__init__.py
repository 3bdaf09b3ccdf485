"""Checkpoint conversion: jaxsora's models in and out of other frameworks' layouts, one module
per model family, on one strict-table machinery.

  tables.py   safetensors files in (single or sharded, pickles refused) and the strict key/shape
              check: every missing, unexpected and misshapen key reported at once
  vae.py      the video VAE <-> diffusers `AutoencoderKLWan`
  __main__.py the command line: `python -m jaxsora.export import-vae | export-vae`

The frozen text encoders (jaxsora/text/) load their Hugging Face checkpoints through tables.py;
the VAE's own directory format is jaxsora/vae_dir.py.
"""
