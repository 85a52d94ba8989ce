"""unipan: unified panoptic segmentation in PyTorch."""

__version__ = "0.1.0"
