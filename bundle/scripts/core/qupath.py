"""QuPath's GeoJSON conventions, shared by the converter (annotations in) and every output (detections out).

Outlines follow QuPath's own labelled-image tracing (ContourTracing): they run along pixel edges, so pixel (row r,
col c) is the square x in [c, c+1], y in [r, r+1] and a traced polygon's area equals its pixel count.  A class is a
PathClass {"name", "color": [r, g, b]} (QuPath v0.4+).
"""

from __future__ import annotations

import numpy as np
import shapely
from scipy import ndimage

from scripts.core.classes import PANNUKE, NucleusClasses


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


def simplify_rings(rings: list[list], tolerance: float) -> list[list]:
    """Closed rings simplified to within `tolerance` pixels (Douglas-Peucker that keeps each ring simple; first ==
    last kept), all at once in GEOS.

    Tracing every pixel step gives about 130 vertices a nucleus; within 1 px, about 10, which keeps a slide of a
    million nuclei to a few hundred MB of GeoJSON.  Rings of 5 points or fewer, and any a simplification would
    shrink below a triangle, are left as they are.
    """
    if tolerance <= 0 or not rings:
        return rings
    todo = [i for i, ring in enumerate(rings) if len(ring) > 5]
    if not todo:
        return rings
    coords = np.concatenate([np.asarray(rings[i], dtype=np.float64) for i in todo])
    index = np.repeat(np.arange(len(todo)), [len(rings[i]) for i in todo])
    simple = shapely.simplify(shapely.linearrings(coords, indices=index), tolerance, preserve_topology=True)
    points, owner = shapely.get_coordinates(simple, return_index=True)
    bounds = np.searchsorted(owner, np.arange(len(todo) + 1))
    out = list(rings)
    for k, i in enumerate(todo):
        ring = points[bounds[k] : bounds[k + 1]]
        if len(ring) >= 4:
            out[i] = ring.tolist()
    return out
