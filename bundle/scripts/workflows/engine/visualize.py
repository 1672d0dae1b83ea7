"""Colour panels for TensorBoard: the input tile, the ground-truth label map and the prediction side by side.

MONAI's TensorBoardImageHandler rescales single-channel maps per image, so class 3 would look different from one
panel to the next; painting the classes with fixed colours (the dataset's type colours, white outlines) keeps them
comparable, and RGB panels pass through the handler untouched.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from scripts.core.classes import PANNUKE_COLOURS


def palette(colours: Sequence[Sequence[int]] = PANNUKE_COLOURS) -> torch.Tensor:
    """(K+2, 3) colours in 0..1: black background, one colour per type, white for the outline class."""
    return torch.tensor([(0, 0, 0), *colours, (255, 255, 255)], dtype=torch.float32) / 255.0


def colour_label(label: torch.Tensor, colours: Sequence[Sequence[int]] = PANNUKE_COLOURS) -> torch.Tensor:
    """(C, H, W) target (class channel first) or (H, W) class map -> (3, H, W) RGB in 0..1."""
    label = torch.as_tensor(label)
    table = palette(colours)
    classes = (label[0] if label.ndim == 3 else label).long().clamp(0, len(table) - 1)
    return table.to(classes.device)[classes].permute(2, 0, 1)


def batch_panels(
    batch: list[dict], colours: Sequence[Sequence[int]] = PANNUKE_COLOURS
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """`batch_transform` for TensorBoardImageHandler (MONAI hands it the decollated batch): tiles, coloured labels.

    Args:
        colours: one RGB per type (`@classes.colours`).
    """
    return [item["image"] for item in batch], [colour_label(item["label"], colours) for item in batch]


def prediction_panels(output: list[dict], colours: Sequence[Sequence[int]] = PANNUKE_COLOURS) -> list[torch.Tensor]:
    """`output_transform` for TensorBoardImageHandler: coloured argmax class predictions (ClassPredictiond).

    Args:
        colours: one RGB per type (`@classes.colours`).
    """
    return [colour_label(item["pred_class"], colours) for item in output]
