"""User media folders; importing registers the `video_folder` TFDS builder."""

from data_pipelines.video_folder.video_folder import VideoFolder

__all__ = ["VideoFolder"]
