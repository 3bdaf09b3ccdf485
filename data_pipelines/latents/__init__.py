"""VAE latents cached from another dataset; importing registers the `latents` TFDS builder."""

from data_pipelines.latents.latents import Latents, LatentsConfig

__all__ = ["Latents", "LatentsConfig"]
