"""Small pyramidal slides made here: demo H&E tiles on glass, JPEG tiles, OME-TIFF with its µm per pixel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

from scripts.pannuke.demo_data import make_tile

GLASS = 242


def write_slide(
    path: Path,
    size: tuple[int, int] = (1536, 1536),
    tissue: tuple[int, int, int, int] = (256, 256, 1280, 1024),
    mpp: float | None = 0.25,
    levels: int = 3,
    seed: int = 0,
) -> np.ndarray:
    """Write the slide and return its level-0 pixels.  `tissue` is (x0, y0, x1, y1) in level-0 pixels."""
    rng = np.random.default_rng(seed)
    image = np.full((size[1], size[0], 3), GLASS, np.uint8)
    x0, y0, x1, y1 = tissue
    for y in range(y0, y1, 256):
        for x in range(x0, x1, 256):
            tile, _ = make_tile(rng)
            h, w = min(256, y1 - y), min(256, x1 - x)
            image[y : y + h, x : x + w] = np.rint(tile[:h, :w]).astype(np.uint8)
    pyramid = [image[:: 2**i, :: 2**i] for i in range(levels)]
    path.parent.mkdir(parents=True, exist_ok=True)
    options = dict(tile=(256, 256), compression="jpeg", photometric="rgb")
    physical = {}
    if mpp is not None:
        physical = dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(path, bigtiff=True, ome=mpp is not None) as tif:
        metadata = {"PhysicalSizeX": mpp, "PhysicalSizeY": mpp} if mpp is not None else None
        tif.write(pyramid[0], subifds=levels - 1, metadata=metadata, **physical, **options)
        for level in pyramid[1:]:
            tif.write(level, subfiletype=1, **options)
    return image


def write_aperio_slide(path: Path, size: int = 1280, tissue: int = 256, mpp: float = 0.25, seed: int = 0) -> np.ndarray:
    """An SVS laid out as Aperio's scanners write it (tiled JPEG pages, the 'Aperio Image Library' description with
    AppMag and MPP), which OpenSlide's Aperio reader opens; returns the level-0 pixels."""
    rng = np.random.default_rng(seed)
    image = np.full((size, size, 3), GLASS, np.uint8)
    for y in range(tissue, size - tissue, 256):
        for x in range(tissue, size - tissue, 256):
            h, w = min(256, size - tissue - y), min(256, size - tissue - x)
            image[y : y + h, x : x + w] = np.rint(make_tile(rng)[0][:h, :w]).astype(np.uint8)
    head = f"Aperio Image Library v12.0.5\r\n{size}x{size} [0,0 {size}x{size}] (256x256) JPEG/RGB Q=90"
    with tifffile.TiffWriter(path) as tif:
        options = dict(tile=(256, 256), compression="jpeg", photometric="rgb", metadata=None)
        tif.write(image, description=f"{head}|AppMag = {round(10 / mpp)}|MPP = {mpp}", **options)
        tif.write(np.ascontiguousarray(image[::4, ::4]), description=f"{head} -> {size // 4}x{size // 4}", **options)
    return image
