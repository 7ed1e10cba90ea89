"""Mask: labels and loss weights per masking policy from a scores table (``data.parquet``)."""

from forgetless.mask.stage import MaskConfig, run_mask

__all__ = ["MaskConfig", "run_mask"]
