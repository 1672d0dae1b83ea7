"""QuPath annotations as training data: a GeoJSON export rasterised into an instance map and a class per nucleus.

QuPath's "Export objects as GeoJSON" writes a FeatureCollection (or, with some options, a bare list of Features).
Each Feature has a `geometry` (Polygon or MultiPolygon in full-resolution pixel coordinates, x to the right, y down,
vertices on pixel corners; holes are the later rings of a polygon) and `properties` with `objectType`
("annotation", "detection", "cell", ...) and, when the object is classified, `classification.name` and
`classification.color` ([r, g, b], or the older packed `colorRGB`).  A cell exported by QuPath also carries its
nucleus as `nucleusGeometry`, which is what is used for a cell.

Each polygon object is one nucleus.  Rasterising follows QuPath's own convention: pixel (row r, column c) belongs
to an object when its centre (c + 0.5, r + 0.5) lies inside the outline and outside its holes.  Objects are clipped
to the image.  Where objects overlap, the smaller object is painted last, so it stays whole and the larger one
loses the shared pixels (a nucleus drawn inside a larger one survives); of two equal ones the earlier stays whole.
Counts of overlaps, clipped objects and objects lost entirely are returned for the converter's log.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from skimage.draw import polygon as draw_polygon

from scripts.core.errors import DataError

UNCLASSIFIED = None  # the class of an object QuPath exported without a classification
# QuPath's built-in classes for areas, not objects: an "Ignore*" or "Region*" annotation is never a nucleus
QUPATH_AREA_CLASSES = ("Ignore*", "Region*")


@dataclass
class Nucleus:
    """One annotated object: its rings (outer first, then holes) per polygon part, its class and colour."""

    parts: list[list[np.ndarray]]
    name: str | None
    colour: tuple[int, int, int] | None


@dataclass
class AnnotationStats:
    """What rasterising the annotations of one or more images did, for the converter's log."""

    objects: int = 0
    not_polygons: Counter = field(default_factory=Counter)  # geometry type -> objects ignored
    areas_ignored: int = 0
    clipped: int = 0
    outside: int = 0
    overlapping: int = 0
    hidden: int = 0
    empty_images: int = 0

    def add(self, other: AnnotationStats) -> None:
        for name in ("objects", "areas_ignored", "clipped", "outside", "overlapping", "hidden", "empty_images"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.not_polygons.update(other.not_polygons)

    def lines(self) -> list[str]:
        out = []
        if self.empty_images:
            out.append(f"images annotated with no nucleus (kept, as background to learn): {self.empty_images}")
        if self.not_polygons:
            kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.not_polygons.items()))
            out.append(f"ignored objects that are not polygons: {kinds}")
        if self.areas_ignored:
            out.append(f"ignored {self.areas_ignored} area annotations classified {' or '.join(QUPATH_AREA_CLASSES)}")
        if self.clipped or self.outside:
            out.append(f"objects partly outside their image, clipped: {self.clipped}; wholly outside: {self.outside}")
        if self.overlapping:
            out.append(
                f"overlapping objects: {self.overlapping} (the smaller one keeps the shared pixels); "
                f"objects left with no pixel: {self.hidden}"
            )
        return out


def _fail(path: Path, what: str) -> DataError:
    return DataError(f"{path}: {what}. Export it from QuPath with File > Export objects as GeoJSON")


def _features(value: Any, path: Path) -> list[dict]:
    if isinstance(value, dict) and value.get("type") == "FeatureCollection":
        value = value.get("features")
    elif isinstance(value, dict) and value.get("type") == "Feature":
        value = [value]
    if not isinstance(value, list):
        raise _fail(path, "not GeoJSON (expected a FeatureCollection or a list of Features)")
    if not all(isinstance(f, dict) and f.get("type") == "Feature" for f in value):
        raise _fail(path, "holds something that is not a GeoJSON Feature")
    return value


def _ring(points: Any, path: Path, index: int) -> np.ndarray:
    try:
        ring = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError):
        ring = np.zeros((0,))
    if ring.ndim != 2 or ring.shape[1] < 2 or ring.shape[0] < 3 or not np.isfinite(ring[:, :2]).all():
        raise _fail(path, f"object {index} has a malformed polygon ring (need at least 3 finite [x, y] points)")
    return ring[:, :2]


def _colour(classification: dict) -> tuple[int, int, int] | None:
    colour = classification.get("color", classification.get("colour"))
    if isinstance(colour, list) and len(colour) == 3 and all(isinstance(v, int) for v in colour):
        return (colour[0] & 255, colour[1] & 255, colour[2] & 255)
    packed = classification.get("colorRGB")
    if isinstance(packed, int):
        return ((packed >> 16) & 255, (packed >> 8) & 255, packed & 255)
    return None


def parse_geojson(path: Path) -> tuple[list[Nucleus], AnnotationStats]:
    """The polygon objects of a QuPath GeoJSON export, in file order; a DataError naming the file if it is not one.

    A collection with no objects is an image annotated as holding no nucleus (glass, stroma): it is kept, and
    counted in `AnnotationStats.empty_images`.  An empty file is an error.
    """
    try:
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise _fail(path, "is an empty file")
        value = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _fail(path, f"not valid JSON ({err})") from None
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror or err})") from None
    stats = AnnotationStats()
    nuclei = []
    features = _features(value, path)
    stats.empty_images = int(not features)
    for index, feature in enumerate(features):
        props = feature.get("properties") or {}
        if not isinstance(props, dict):
            raise _fail(path, f"object {index} has properties that are not an object")
        geometry = feature.get("nucleusGeometry") or feature.get("geometry")
        if not isinstance(geometry, dict) or "type" not in geometry:
            raise _fail(path, f"object {index} has no geometry")
        classification = props.get("classification") or {}
        if not isinstance(classification, dict):
            raise _fail(path, f"object {index} has a classification that is not an object")
        name = classification.get("name")
        name = str(name).strip() if name is not None and str(name).strip() else UNCLASSIFIED
        if name in QUPATH_AREA_CLASSES:
            stats.areas_ignored += 1
            continue
        kind = geometry["type"]
        coords = geometry.get("coordinates")
        if kind == "Polygon":
            polygons = [coords]
        elif kind == "MultiPolygon":
            polygons = coords
        else:
            stats.not_polygons[str(kind)] += 1
            continue
        if not isinstance(polygons, list) or not polygons or not all(isinstance(p, list) and p for p in polygons):
            raise _fail(path, f"object {index} ({kind}) has no coordinates")
        parts = [[_ring(ring, path, index) for ring in rings] for rings in polygons]
        nuclei.append(Nucleus(parts, name, _colour(classification)))
        stats.objects += 1
    return nuclei, stats


def _pixels(nucleus: Nucleus, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, bool, bool]:
    """Pixels of one object inside an image of `shape` (row, column arrays), and whether it was clipped / wholly out.

    Drawn on the object's bounding box (clipped to the image), not on a whole-image array: an image of thousands of
    nuclei would otherwise hold one image-sized mask per nucleus.
    """
    outer = np.concatenate([rings[0] for rings in nucleus.parts]) - 0.5  # pixel centres at (c + 0.5, r + 0.5)
    xs, ys = outer[:, 0], outer[:, 1]
    clipped = bool(xs.min() < -0.5 or ys.min() < -0.5 or xs.max() > shape[1] - 0.5 or ys.max() > shape[0] - 0.5)
    r0, c0 = max(0, int(np.floor(ys.min()))), max(0, int(np.floor(xs.min())))
    r1, c1 = min(shape[0], int(np.ceil(ys.max())) + 1), min(shape[1], int(np.ceil(xs.max())) + 1)
    if r1 <= r0 or c1 <= c0:
        return np.zeros(0, np.intp), np.zeros(0, np.intp), False, True
    inside = np.zeros((r1 - r0, c1 - c0), dtype=bool)
    for rings in nucleus.parts:
        part = np.zeros_like(inside)
        for k, ring in enumerate(rings):
            rr, cc = draw_polygon(ring[:, 1] - 0.5 - r0, ring[:, 0] - 0.5 - c0, shape=inside.shape)
            part[rr, cc] = k == 0  # the outer ring paints, holes erase
        inside |= part
    rr, cc = np.nonzero(inside)
    wholly_out = clipped and rr.size == 0
    return rr + r0, cc + c0, clipped and not wholly_out, wholly_out


def rasterise(nuclei: list[Nucleus], shape: tuple[int, int]) -> tuple[np.ndarray, list[int], AnnotationStats]:
    """(H, W) uint32 instance map with ids 1..N in file order, the object index of each id, and what happened.

    Objects are painted largest first, so the smaller of two overlapping objects keeps the shared pixels.
    """
    stats = AnnotationStats()
    masks = []
    for k, nucleus in enumerate(nuclei):
        rr, cc, clipped, outside = _pixels(nucleus, shape)
        stats.clipped += clipped
        stats.outside += outside
        if rr.size:
            masks.append((k, (rr, cc)))
    inst = np.zeros(shape, dtype=np.uint32)
    painted = np.zeros(shape, dtype=bool)
    order = sorted(range(len(masks)), key=lambda i: (-masks[i][1][0].size, -i))  # equal sizes: earlier on top
    for i in order:
        pixels = masks[i][1]
        stats.overlapping += bool(painted[pixels].any())
        inst[pixels] = i + 1
        painted[pixels] = True
    present = np.zeros(len(masks) + 1, dtype=bool)
    present[np.unique(inst)] = True
    stats.hidden = int((~present[1:]).sum())
    # relabel to the objects that kept pixels, in file order
    ids = np.flatnonzero(present[1:]) + 1
    lut = np.zeros(len(masks) + 1, dtype=np.uint32)
    lut[ids] = np.arange(1, ids.size + 1, dtype=np.uint32)
    return lut[inst], [masks[i - 1][0] for i in ids.tolist()], stats


def annotations_geojson(
    inst: np.ndarray, names: dict[int, str | None], colours: dict[str, tuple[int, int, int]] | None = None
) -> dict:
    """A label map as QuPath writes annotations: one classified Polygon Feature per nucleus (the inverse of
    `rasterise` for nuclei in one piece without holes), e.g. to correct existing masks in QuPath.

    Args:
        inst: (H, W) instance map, 0 = background.
        names: class name per instance id (None = unclassified).
        colours: optional RGB per class name, written as QuPath's `classification.color`.
    """
    from scripts.core.qupath import label_outlines  # noqa: PLC0415 - only this writer needs the tracer

    features = []
    ids = np.unique(inst[inst > 0])
    for ident, ring in zip(ids.tolist(), label_outlines(inst, ids), strict=True):
        props: dict[str, Any] = {"objectType": "annotation"}
        name = names.get(ident)
        if name is not None:
            props["classification"] = {"name": name, **({"color": list(colours[name])} if colours else {})}
        geometry = {"type": "Polygon", "coordinates": [ring]}
        features.append({"type": "Feature", "geometry": geometry, "properties": props})
    return {"type": "FeatureCollection", "features": features}
