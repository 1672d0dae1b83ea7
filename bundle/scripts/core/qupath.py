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


_CROSS = ndimage.generate_binary_structure(2, 1)


def _largest_part(mask: np.ndarray) -> np.ndarray:
    """Keep the biggest 4-connected piece and fill its holes: QuPath detections are one simple polygon each.

    A hole is a 4-connected piece of the rest that does not reach the mask's border (as `binary_fill_holes`
    defines it); labelling the rest once finds them without that function's repeated dilations.
    """
    labels, n = ndimage.label(mask, _CROSS)
    if n > 1:
        sizes = np.bincount(labels.ravel())[1:]
        mask = labels == (int(np.argmax(sizes)) + 1)
    rest, pieces = ndimage.label(~mask, _CROSS)
    if pieces == 0:
        return mask
    open_pieces = np.unique(np.concatenate([rest[0], rest[-1], rest[:, 0], rest[:, -1]]))
    enclosed = np.ones(pieces + 1, dtype=bool)
    enclosed[open_pieces] = False
    enclosed[0] = False
    return mask | enclosed[rest]


# The four pixel sides as (row step to the neighbour, col step, start vertex (dx, dy), end vertex (dx, dy)), oriented
# with the mask on the walker's right on screen: that makes the ring's shoelace area positive in (x, y) numbers,
# i.e. counter-clockwise in the y-up sense RFC 7946 asks of exterior rings.
_SIDES = (
    (-1, 0, (0, 0), (1, 0)),  # background above: top edge, left to right
    (0, 1, (1, 0), (1, 1)),  # background right: right edge, downwards
    (1, 0, (1, 1), (0, 1)),  # background below: bottom edge, right to left
    (0, -1, (0, 1), (0, 0)),  # background left: left edge, upwards
)


def _traced_rings(labels: np.ndarray, ids: np.ndarray, offset_xy: tuple[int, int]) -> list[list | None]:
    """Each id's outer ring [[x, y], ...] (first == last) along the unit pixel edges between it and anything else,
    from its top-left vertex; None for an id that has no edge, two pixels meeting at a corner only, or more than one
    ring (a hole or another piece), which `outline_polygon` must clean first. Edges of all ids are found and linked
    in whole-array steps; the walk along the rings is one loop over their edges."""
    height, width = labels.shape
    wanted = np.zeros(int(max(labels.max(initial=0), ids.max())) + 1, dtype=bool)
    wanted[ids] = True
    padded = np.pad(labels, 1)
    inner = padded[1:-1, 1:-1]
    owners, starts, ends = [], [], []
    for dr, dc, (sx, sy), (ex, ey) in _SIDES:
        rows, cols = np.nonzero(wanted[inner] & (inner != padded[1 + dr : 1 + dr + height, 1 + dc : 1 + dc + width]))
        owners.append(inner[rows, cols].astype(np.int64))
        starts.append(np.stack([cols + sx, rows + sy], axis=1))
        ends.append(np.stack([cols + ex, rows + ey], axis=1))
    owner, start, end = np.concatenate(owners), np.concatenate(starts), np.concatenate(ends)
    step = end - start
    plane = (height + 1) * (width + 1)
    key = owner * plane + start[:, 1] * (width + 1) + start[:, 0]
    end_key = owner * plane + end[:, 1] * (width + 1) + end[:, 0]
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    after = order[np.searchsorted(sorted_key, end_key)]
    edges_of = np.bincount(owner, minlength=len(wanted))
    special = edges_of == 0  # an id that is not in the map
    special[owner[order[1:][sorted_key[1:] == sorted_key[:-1]]]] = True  # a corner two of its pixels share
    # walk each id's ring from its top-left vertex (its first edge in key order); an id left with edges is special
    firsts = order[np.flatnonzero(np.r_[True, owner[order[1:]] != owner[order[:-1]]])]
    firsts = firsts[~special[owner[firsts]]]  # with no shared corner, each edge has one successor: rings close
    nxt = after.tolist()
    path: list[int] = []
    bounds = [0]
    for first in firsts.tolist():
        path.append(first)
        here = nxt[first]
        while here != first:
            path.append(here)
            here = nxt[here]
        bounds.append(len(path))
    path_arr = np.asarray(path, dtype=np.int64)
    ring_owner = owner[firsts]
    ring_edges = np.diff(bounds)
    special[ring_owner[ring_edges != edges_of[ring_owner]]] = True  # more rings than one: a hole or another piece
    ring_of = np.zeros(len(wanted), dtype=np.int64)
    ring_of[ring_owner] = np.arange(len(firsts))
    position = np.arange(len(path_arr)) - 1
    position[bounds[:-1]] = np.asarray(bounds[1:]) - 1  # a ring's first edge follows its last
    corner = np.any(step[path_arr] != step[path_arr[position]], axis=1)  # one vertex per turn of a staircase
    corner_ring = np.repeat(np.arange(len(firsts)), ring_edges)[corner]
    points = (start[path_arr[corner]] + np.asarray(offset_xy)).tolist()
    cuts = np.searchsorted(corner_ring, np.arange(len(firsts) + 1)).tolist()
    rings: list[list | None] = []
    for nucleus_id in ids.tolist():
        k = int(ring_of[nucleus_id])
        rings.append(None if special[nucleus_id] else [*points[cuts[k] : cuts[k + 1]], points[cuts[k]]])
    return rings


def outline_polygon(mask: np.ndarray, offset_xy: tuple[int, int] = (0, 0)) -> list[list[int]]:
    """Closed pixel-edge outline [[x, y], ...] (first == last) of a binary mask's largest part, holes filled."""
    part = _largest_part(np.asarray(mask, dtype=bool))
    if not part.any():
        raise ValueError("outline_polygon got an empty mask")
    # one 4-connected piece without holes has one ring, and no two of its pixels meet at a corner only (they would
    # enclose a hole), so it is always traced
    (ring,) = _traced_rings(part.astype(np.uint8), np.array([1]), offset_xy)
    return ring


def label_outlines(labels: np.ndarray, ids: np.ndarray, offset_xy: tuple[int, int] = (0, 0)) -> list[list[list[int]]]:
    """`outline_polygon` of every id in a label map, in whole-array steps: the same rings, many times faster.

    An id whose mask `outline_polygon` would first change (several pieces, a hole, two of its pixels touching at a
    corner only) takes that function's path, so every ring is exactly what it would return.
    """
    labels = np.asarray(labels)
    ids = np.asarray(ids, dtype=np.int64).ravel()
    if len(ids) == 0:
        return []
    rings = _traced_rings(labels, ids, offset_xy)
    todo = [i for i, ring in enumerate(rings) if ring is None]
    boxes = ndimage.find_objects(labels.astype(np.intp, copy=False)) if todo else []
    for i in todo:
        rows, cols = boxes[int(ids[i]) - 1]
        rings[i] = outline_polygon(labels[rows, cols] == ids[i], (cols.start + offset_xy[0], rows.start + offset_xy[1]))
    return rings


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
