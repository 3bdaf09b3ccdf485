"""Procedural captioned clips; importing registers the `synthetic_clips` TFDS builder."""

from data_pipelines.synthetic_clips.synthetic_clips import SyntheticClips, SyntheticClipsConfig

__all__ = ["SyntheticClips", "SyntheticClipsConfig"]
