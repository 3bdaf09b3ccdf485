"""Real clips and photos from PyPI packages; importing registers the `sample_media` builder."""

from data_pipelines.sample_media.sample_media import SampleMedia, SampleMediaConfig

__all__ = ["SampleMedia", "SampleMediaConfig"]
