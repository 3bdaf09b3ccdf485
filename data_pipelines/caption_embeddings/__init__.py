"""Another dataset plus frozen-text-encoder caption embeddings; importing registers the
`caption_embeddings` TFDS builder."""

from data_pipelines.caption_embeddings.caption_embeddings import (
    CaptionEmbeddings,
    CaptionEmbeddingsConfig,
)

__all__ = ["CaptionEmbeddings", "CaptionEmbeddingsConfig"]
