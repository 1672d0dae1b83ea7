"""Writers for one image's inference output: label maps, QuPath GeoJSON, a measurements CSV and a PNG overlay.

Inputs shared by every writer (one image):
  inst         (H, W) integer instance map, 0 = background, one id per nucleus
  inst_types   (N+1,) uint8, inst_types[id] = type id 1..K of `classes` (PanNuke's 5 by default); index 0 unused
  inst_probs   (N+1,) float32, probability of the predicted type per id
  image        (H, W, 3) uint8 RGB

Coordinates: GeoJSON polygons follow QuPath's own labelled-image tracing (ContourTracing): they run along pixel
edges, so pixel (row r, col c) is the square x in [c, c+1], y in [r, r+1] and a polygon's area equals its pixel
count.  The nucleus record (CSV rows and GeoJSON detections, tiles and slides alike) is built in nucleus_record.py.

Every writer writes a temp file next to the target and renames it into place, so a reader never sees half a file,
and refuses to replace an existing file unless overwrite=True.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.measure import approximate_polygon

from scripts.io.atomic import atomic_write, write_json
from scripts.classes import PANNUKE, NucleusClasses

PathLike = str | os.PathLike

# unit steps along a pixel-edge outline, in (dx, dy) image coordinates (y grows downwards)
_RIGHT, _DOWN, _LEFT, _UP = (1, 0), (0, 1), (-1, 0), (0, -1)


# ---------------------------------------------------------------- validation


def check_inst(inst: np.ndarray) -> np.ndarray:
    """Reject label maps that would silently write garbage (floats, 3-D, negative ids)."""
    inst = np.asarray(inst)
    if inst.ndim != 2:
        raise ValueError(f"inst must be a 2-D (H, W) instance map, got shape {inst.shape}")
    if not np.issubdtype(inst.dtype, np.integer):
        raise ValueError(f"inst must have an integer dtype, got {inst.dtype}")
    if inst.size and inst.min() < 0:
        raise ValueError("inst has negative ids; ids must be >= 0 (0 = background)")
    return inst


def check_per_instance(
    inst: np.ndarray, inst_types: np.ndarray, inst_probs: np.ndarray | None, classes: NucleusClasses = PANNUKE
) -> np.ndarray:
    """Check the per-id arrays cover every id in inst and every present type is one of `classes`; return ids."""
    ids = np.unique(inst)
    ids = ids[ids != 0]
    inst_types = np.asarray(inst_types)
    for name, arr in (("inst_types", inst_types), ("inst_probs", inst_probs)):
        if arr is not None and (np.ndim(arr) != 1 or len(arr) <= (int(ids.max()) if ids.size else 0)):
            raise ValueError(
                f"{name} must be 1-D with an entry for every id up to inst.max()={int(inst.max(initial=0))}, "
                f"got shape {np.shape(arr)}"
            )
    if ids.size:
        bad = ids[(inst_types[ids] < 1) | (inst_types[ids] > classes.num_types)]
        if bad.size:
            raise ValueError(
                f"inst_types must be 1..{classes.num_types} ({', '.join(classes.names)}) for every nucleus; ids "
                f"{bad[:10].tolist()} have types {inst_types[bad[:10]].tolist()}"
            )
    return ids


def _label_dtype(inst: np.ndarray) -> np.dtype:
    """Smallest unsigned type that keeps every id: uint16 for usual images, uint32 for whole slides."""
    top = int(inst.max(initial=0))
    if top >= 2**32:
        raise ValueError(f"inst max id {top} does not fit in uint32")
    return np.dtype(np.uint16) if top < 2**16 else np.dtype(np.uint32)


# ---------------------------------------------------------------- label maps


def write_label_tiff(path: PathLike, inst: np.ndarray, overwrite: bool = False) -> Path:
    """Lossless zlib TIFF of the instance map (uint16, or uint32 past 65535 ids) that QuPath and Fiji open."""
    import tifffile

    inst = check_inst(inst)
    data = inst.astype(_label_dtype(inst))
    return atomic_write(path, lambda tmp: tifffile.imwrite(tmp, data, compression="zlib"), overwrite)


def write_label_nifti(path: PathLike, inst: np.ndarray, overwrite: bool = False) -> Path:
    """NIfTI (.nii / .nii.gz) of the instance map for MONAI / 3D Slicer style tools.

    NIfTI's first axis is x, so the array is stored transposed, (W, H), as MONAI's own PNG -> NIfTI saving does;
    read it back with np.asarray(nib.load(path).dataobj).T.
    """
    import nibabel as nib

    inst = check_inst(inst)
    name = Path(path).name
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        raise ValueError(f"{path}: a NIfTI file name must end in .nii or .nii.gz")
    img = nib.Nifti1Image(np.ascontiguousarray(inst.T.astype(_label_dtype(inst))), affine=np.eye(4))
    img.header.set_intent("label")
    return atomic_write(path, lambda tmp: nib.save(img, str(tmp)), overwrite)


# ---------------------------------------------------------------- outlines


def _largest_part(mask: np.ndarray) -> np.ndarray:
    """Keep the biggest 4-connected piece and fill its holes: QuPath detections are one simple polygon each."""
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = np.bincount(labels.ravel())[1:]
        mask = labels == (int(np.argmax(sizes)) + 1)
    return ndimage.binary_fill_holes(mask)


def _boundary_edges(mask: np.ndarray) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """Unit pixel-edge segments between mask and non-mask, oriented with the mask on the walker's right on screen.

    That orientation makes the traced ring's shoelace area positive in (x, y) numbers, i.e. counter-clockwise in the
    y-up sense RFC 7946 asks of exterior rings.  Keys are start vertices (x, y); values the end vertices.
    """
    padded = np.pad(mask, 1)
    inner = padded[1:-1, 1:-1]
    edges: dict[tuple[int, int], list[tuple[int, int]]] = {}
    sides = (
        (padded[:-2, 1:-1], (0, 0), (1, 0)),  # background above: top edge, left to right
        (padded[1:-1, 2:], (1, 0), (1, 1)),  # background right: right edge, downwards
        (padded[2:, 1:-1], (1, 1), (0, 1)),  # background below: bottom edge, right to left
        (padded[1:-1, :-2], (0, 1), (0, 0)),  # background left: left edge, upwards
    )
    for neighbour, (sx, sy), (ex, ey) in sides:
        rows, cols = np.nonzero(inner & ~neighbour)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            edges.setdefault((c + sx, r + sy), []).append((c + ex, r + ey))
    return edges


def _trace_ring(edges: dict[tuple[int, int], list[tuple[int, int]]]) -> list[tuple[int, int]]:
    """Walk the outer boundary from its top-left vertex; at a pinch point turn right so diagonal touches stay apart."""
    start = min(edges, key=lambda v: (v[1], v[0]))
    ring = [start]
    here, heading = start, None
    while True:
        options = edges[here]
        if len(options) == 1 or heading is None:
            nxt = options.pop(0)
        else:  # pinch point: prefer the right turn (screen coordinates), which hugs the current pixel
            right = (-heading[1], heading[0])
            pick = next((i for i, e in enumerate(options) if (e[0] - here[0], e[1] - here[1]) == right), 0)
            nxt = options.pop(pick)
        if not options:
            del edges[here]
        heading = (nxt[0] - here[0], nxt[1] - here[1])
        if nxt == start:
            break
        ring.append(nxt)
        here = nxt
    return ring


def _drop_collinear(ring: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Keep only corners, so a staircase outline costs one vertex per turn, then close the ring."""
    n = len(ring)
    corners = []
    for i in range(n):
        prev, cur, nxt = ring[i - 1], ring[i], ring[(i + 1) % n]
        if (cur[0] - prev[0], cur[1] - prev[1]) != (nxt[0] - cur[0], nxt[1] - cur[1]):
            corners.append(cur)
    return [*corners, corners[0]]


def outline_polygon(mask: np.ndarray, offset_xy: tuple[int, int] = (0, 0)) -> list[list[int]]:
    """Closed pixel-edge outline [[x, y], ...] (first == last) of a binary mask's largest part, holes filled."""
    part = _largest_part(np.asarray(mask, dtype=bool))
    if not part.any():
        raise ValueError("outline_polygon got an empty mask")
    ring = _drop_collinear(_trace_ring(_boundary_edges(part)))
    ox, oy = offset_xy
    return [[x + ox, y + oy] for x, y in ring]


# ---------------------------------------------------------------- GeoJSON


def qupath_classification(type_id: int, classes: NucleusClasses = PANNUKE) -> dict:
    """QuPath (v0.4+) reads a PathClass from {"name", "color": [r, g, b]}."""
    return {"name": classes.name(type_id), "color": list(classes.colour(type_id))}


def qupath_detection(
    nucleus_id: int,
    ring: list,
    type_id: int,
    measurements: dict,
    properties: dict | None = None,
    classes: NucleusClasses = PANNUKE,
) -> dict:
    """One nucleus as a QuPath detection Feature: its outline, its type as a PathClass, its measurements, and any
    further properties."""
    return {
        "type": "Feature",
        "id": nucleus_id,
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {
            "objectType": "detection",
            "classification": qupath_classification(type_id, classes),
            "measurements": measurements,
            **(properties or {}),
        },
    }


def simplify_ring(ring: list, tolerance: float) -> list:
    """A closed ring simplified to within `tolerance` pixels (Douglas-Peucker; first == last kept).

    Tracing every pixel step gives about 130 vertices a nucleus; within 1 px, about 10, which keeps a slide of a
    million nuclei to a few hundred MB of GeoJSON.  Rings of 5 points or fewer are left as they are.
    """
    if tolerance <= 0 or len(ring) <= 5:
        return ring
    simple = approximate_polygon(np.asarray(ring, dtype=np.float64), tolerance)
    return simple.tolist() if len(simple) >= 4 else ring


def write_geojson(path: PathLike, fc: Mapping, overwrite: bool = False) -> Path:
    """Compact UTF-8 GeoJSON; QuPath imports it by drag and drop or File > Import objects."""
    if fc.get("type") != "FeatureCollection":
        raise ValueError("write_geojson expects a GeoJSON FeatureCollection dict (see instances_to_geojson)")
    return write_json(path, fc, overwrite, indent=None)


# ---------------------------------------------------------------- overlay


def overlay_image(
    image: np.ndarray, inst: np.ndarray, inst_types: np.ndarray, classes: NucleusClasses = PANNUKE
) -> np.ndarray:
    """Copy of image with each nucleus's inner boundary pixels painted in its type colour."""
    from skimage.segmentation import find_boundaries

    inst = check_inst(inst)
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8 RGB, got shape {image.shape} dtype {image.dtype}")
    if image.shape[:2] != inst.shape:
        raise ValueError(f"image is {image.shape[:2]} but inst is {inst.shape}; they must be the same size")
    check_per_instance(inst, inst_types, None, classes)
    out = image.copy()
    edge = find_boundaries(inst, mode="inner") & (inst > 0)
    palette = np.array([(0, 0, 0), *classes.colours], dtype=np.uint8)
    out[edge] = palette[np.asarray(inst_types)[inst[edge]]]
    return out


def overlay_png(
    path: PathLike,
    image: np.ndarray,
    inst: np.ndarray,
    inst_types: np.ndarray,
    overwrite: bool = False,
    classes: NucleusClasses = PANNUKE,
) -> Path:
    """PNG of overlay_image for a quick visual check of the predictions."""
    from PIL import Image

    picture = Image.fromarray(overlay_image(image, inst, inst_types, classes))
    return atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"), overwrite)
