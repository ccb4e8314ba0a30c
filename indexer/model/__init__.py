"""The model layer: `clip` (ClipModel: encode images and texts, device and dtype), `lazy` (LazyModel, no torch
until first use), `weights` (finding and naming the weights), `hfclip` (transformers CLIP directories as open_clip).
"""
