"""Pixel accuracy over the 7 label classes, as a MONAI cumulative metric so IgniteMetricHandler can report it."""

from __future__ import annotations

import torch
from monai.metrics import CumulativeIterationMetric
from monai.metrics.utils import do_metric_reduction


class PixelAccuracyMetric(CumulativeIterationMetric):
    """Fraction of pixels whose predicted class equals the label, per image, averaged over images."""

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if y_pred.shape != y.shape:
            raise ValueError(f"pixel accuracy needs argmax predictions shaped like the label, got {y_pred.shape} vs {y.shape}")
        return (y_pred == y).float().flatten(1).mean(dim=1, keepdim=True)

    def aggregate(self) -> torch.Tensor:  # type: ignore[override]
        value, _ = do_metric_reduction(self.get_buffer(), "mean")
        return value
