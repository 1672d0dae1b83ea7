"""Validation metrics as MONAI cumulative metrics, so IgniteMetricHandler can report them (on 1 or N GPUs)."""

from __future__ import annotations

import torch
from monai.metrics import CumulativeIterationMetric
from monai.metrics.utils import do_metric_reduction

from scripts.workflows.evaluate.pq import pq_counts


class _MeanOverImages(CumulativeIterationMetric):
    """A per-image score, averaged over the images (NaN scores skipped) when the metric is aggregated."""

    def aggregate(self) -> torch.Tensor:  # type: ignore[override]
        value, _ = do_metric_reduction(self.get_buffer(), "mean")
        return value


class PixelAccuracyMetric(_MeanOverImages):
    """Fraction of pixels whose predicted class equals the label's class channel (channel 0), per image, averaged."""

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        y = y[:, :1]
        if y_pred.shape != y.shape:
            raise ValueError(f"pixel accuracy needs argmax classes shaped like the label: {y_pred.shape} vs {y.shape}")
        return (y_pred == y).float().flatten(1).mean(dim=1, keepdim=True)


class BinaryPQMetric(_MeanOverImages):
    """bPQ per image (all nuclei as one class, IoU > 0.5, the project's official per-image PQ), averaged over images.

    Takes predicted and true instance maps (B, 1, H, W); an image without true nuclei is NaN and skipped, as in the
    PanNuke protocol.  This is the validation key metric: the best checkpoint and early stopping follow it.
    """

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if y_pred.shape != y.shape:
            raise ValueError(f"bPQ needs predicted and true instance maps of one shape: {y_pred.shape} vs {y.shape}")
        pred, true = y_pred.detach().cpu().numpy(), y.detach().cpu().numpy()
        scores = [
            pq_counts(t.reshape(t.shape[-2:]), p.reshape(p.shape[-2:]))[2] if t.any() else float("nan")
            for p, t in zip(pred, true, strict=True)
        ]
        return torch.tensor(scores, dtype=torch.float32, device=y.device).view(-1, 1)
