"""Image indexer: CLIP ViT-L/14 embeddings of image folders in Qdrant, searchable by text and image."""

__version__ = "0.1.0"
