"""Slides to bags: slide access, tissue segmentation, tiling, backbones, patch reading, bag files."""
