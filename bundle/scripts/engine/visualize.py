"""Colour panels for TensorBoard: the input tile, the ground-truth label map and the prediction side by side.

MONAI's TensorBoardImageHandler rescales single-channel maps per image, so class 3 would look different from one
panel to the next; painting the 7 classes with fixed colours (PanNuke type colours, white outlines) keeps them
comparable, and RGB panels pass through the handler untouched.
"""

from __future__ import annotations

import torch

from scripts.pannuke.format import TYPE_COLOURS

PALETTE = torch.tensor([(0, 0, 0), *TYPE_COLOURS, (255, 255, 255)], dtype=torch.float32) / 255.0


def colour_label(label: torch.Tensor) -> torch.Tensor:
    """(C, H, W) target (class channel first) or (H, W) class map -> (3, H, W) RGB in 0..1."""
    label = torch.as_tensor(label)
    classes = (label[0] if label.ndim == 3 else label).long().clamp(0, len(PALETTE) - 1)
    return PALETTE.to(classes.device)[classes].permute(2, 0, 1)


def batch_panels(batch: list[dict]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """`batch_transform` for TensorBoardImageHandler (MONAI hands it the decollated batch): tiles, coloured labels."""
    return [item["image"] for item in batch], [colour_label(item["label"]) for item in batch]


def prediction_panels(output: list[dict]) -> list[torch.Tensor]:
    """`output_transform` for TensorBoardImageHandler: coloured argmax class predictions (ClassPredictiond)."""
    return [colour_label(item["pred_class"]) for item in output]
