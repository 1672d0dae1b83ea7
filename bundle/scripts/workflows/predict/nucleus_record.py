"""The one nucleus record every output is made of: tile inference and slide inference write the same CSV columns,
the same QuPath detections and the same centroid convention.

Coordinates are pixel edges, as QuPath draws them: pixel (row r, col c) is the square x in [c, c+1], y in [r, r+1],
so its centre is (c + 0.5, r + 0.5), and a centroid is the mean of its nucleus' pixel centres.  This convention
survives a change of resolution (a slide analysed at another level: input pixel = model pixel x scale), which the
array-index convention (centre = c) does not, and it is the convention of the GeoJSON outlines and of QuPath's own
"Centroid X px".

CSV columns, one row per nucleus (`NUCLEUS_COLUMNS`):
    nucleus_id                 the nucleus' id in its file (for an image: its id in the `_instances.tif` label map)
    x_px, y_px, x_um, y_um     centroid in pixels of the input (level 0 of a slide) and in µm
    area_px, area_um2          area in input pixels and µm²
    perimeter_px, perimeter_um perimeter (skimage's estimate at the resolution the model saw)
    eccentricity               of the ellipse with the nucleus' second moments (0 = circle)
    type, type_id, probability the predicted class, its id (1..K), the class's share of the nucleus' type probability
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from scripts.core.classes import NucleusClasses
from scripts.core.atomic import spreadsheet_safe, write_text
from scripts.workflows.predict.nuclei_writers import check_inst, check_per_instance
from scripts.core.qupath import label_outlines, qupath_detection, simplify_rings

NUCLEUS_COLUMNS = (
    "nucleus_id",
    "x_px",
    "y_px",
    "x_um",
    "y_um",
    "area_px",
    "area_um2",
    "perimeter_px",
    "perimeter_um",
    "eccentricity",
    "type",
    "type_id",
    "probability",
)
CSV_HEADER = ",".join(NUCLEUS_COLUMNS) + "\n"
GEOJSON_HEAD = '{"type":"FeatureCollection","features":[\n'  # a slide's file grows between the two
GEOJSON_TAIL = "\n]}\n"
TYPE_ID_COLUMN = NUCLEUS_COLUMNS.index("type_id")
_FORMATS = {"x_px": ".2f", "y_px": ".2f", "x_um": ".3f", "y_um": ".3f", "area_px": ".1f", "area_um2": ".2f"}
_FORMATS |= {"perimeter_px": ".2f", "perimeter_um": ".2f", "eccentricity": ".4f", "probability": ".4f"}


# skimage's perimeter estimate: a border pixel's code is 1 + 2 x (4-neighbours on the border) + 10 x (diagonal
# neighbours on the border), and each code has a length (skimage.measure.perimeter, 4-connectivity)
_PERIMETER_WEIGHTS = np.zeros(50)
_PERIMETER_WEIGHTS[[5, 7, 15, 17, 25, 27]] = 1.0
_PERIMETER_WEIGHTS[[21, 33]] = np.sqrt(2)
_PERIMETER_WEIGHTS[[13, 23]] = (1 + np.sqrt(2)) / 2
_SIDES = ((-1, 0), (1, 0), (0, -1), (0, 1))
_DIAGONALS = ((-1, -1), (-1, 1), (1, -1), (1, 1))


def region_measures(inst: np.ndarray) -> dict[str, np.ndarray]:
    """What `skimage.measure.regionprops_table(inst, properties=("label", "centroid", "area", "perimeter",
    "eccentricity"))` gives, for every label at once: sums over the nucleus pixels instead of one Python object
    per nucleus."""
    inst = np.asarray(inst)
    h, w = inst.shape
    pixels = np.flatnonzero(inst)
    owner = inst.ravel()[pixels].astype(np.int64)
    labels = np.unique(owner)
    size = int(labels[-1]) + 1 if len(labels) else 1
    rows, cols = (pixels // w).astype(np.float64), (pixels % w).astype(np.float64)

    def per_label(weights: np.ndarray | None = None, at: np.ndarray = owner) -> np.ndarray:
        return np.bincount(at, weights, size)[labels].astype(np.float64)

    area = per_label()  # at least 1: the labels are those of the pixels
    mean_r, mean_c = per_label(rows) / area, per_label(cols) / area
    # central second moments: each pixel's offset from its own nucleus' centroid (no large-number cancellation)
    centre_r, centre_c = np.zeros(size), np.zeros(size)
    centre_r[labels], centre_c[labels] = mean_r, mean_c
    dr, dc = rows - centre_r[owner], cols - centre_c[owner]
    var_r, var_c, cov = per_label(dr * dr) / area, per_label(dc * dc) / area, per_label(dr * dc) / area
    half_sum, root = (var_r + var_c) / 2, np.sqrt(((var_r - var_c) / 2) ** 2 + cov**2)
    major, minor = np.clip(half_sum + root, 0, None), np.clip(half_sum - root, 0, None)
    ratio = np.divide(minor, major, out=np.ones_like(major), where=major > 0)
    eccentricity = np.where(major > 0, np.sqrt(1 - ratio), 0.0)

    # perimeter: the border pixels are those with a 4-neighbour of another label (or outside the array)
    padded = np.pad(inst, 1)
    r, c = pixels // w + 1, pixels % w + 1
    on_border = np.zeros(len(pixels), bool)
    for dy, dx in _SIDES:
        on_border |= padded[r + dy, c + dx] != padded[r, c]
    border = np.zeros((h + 2, w + 2), bool)
    border[r[on_border], c[on_border]] = True
    r, c, at = r[on_border], c[on_border], owner[on_border]
    code = np.ones(len(r), np.int64)
    for weight, offsets in ((2, _SIDES), (10, _DIAGONALS)):
        for dy, dx in offsets:
            code += weight * (border[r + dy, c + dx] & (padded[r + dy, c + dx] == padded[r, c]))
    perimeter = per_label(_PERIMETER_WEIGHTS[code], at)
    return {
        "label": labels,
        "centroid-0": mean_r,
        "centroid-1": mean_c,
        "area": area,
        "perimeter": perimeter,
        "eccentricity": eccentricity,
    }


def nucleus_table(
    inst: np.ndarray,
    inst_types: np.ndarray,
    inst_probs: np.ndarray,
    classes: NucleusClasses,
    mpp: float = 0.25,
    origin: Sequence[float] = (0, 0),
    scale: float = 1.0,
    core: Sequence[float] | None = None,
) -> dict[str, np.ndarray]:
    """The record's columns for the nuclei of one analysed array, sorted by label id.

    Args:
        inst, inst_types, inst_probs: the instance map and its per-id type and probability (see nuclei_writers).
        classes: the model's classes, for the type names.
        mpp: µm per pixel of `inst` (the model's pixels).
        origin: (x, y) of `inst`'s top-left corner in the model pixels of the whole image or slide.
        scale: input pixels per model pixel (1 for an image analysed as it is; a slide read at another level).
        core: (x, y, w, h) in model pixels: keep only the nuclei whose centroid lies inside (a slide tile keeps the
            nuclei it is responsible for); None keeps all.
    """
    inst = check_inst(inst)
    check_per_instance(inst, inst_types, inst_probs, classes)
    props = region_measures(inst)
    x = origin[0] + props["centroid-1"] + 0.5  # model pixels, pixel-edge convention
    y = origin[1] + props["centroid-0"] + 0.5
    keep = np.ones(len(x), bool)
    if core is not None:
        x0, y0, w, h = core
        keep = (x >= x0) & (x < x0 + w) & (y >= y0) & (y < y0 + h)
    ids = props["label"][keep].astype(np.int64)
    x, y, area, perimeter = x[keep], y[keep], props["area"][keep], props["perimeter"][keep]
    type_ids = np.asarray(inst_types)[ids].astype(np.int64)
    return {
        "nucleus_id": ids,
        "x_px": x * scale,
        "y_px": y * scale,
        "x_um": x * mpp,
        "y_um": y * mpp,
        "area_px": area * scale**2,
        "area_um2": area * mpp**2,
        "perimeter_px": perimeter * scale,
        "perimeter_um": perimeter * mpp,
        "eccentricity": props["eccentricity"][keep].astype(np.float64),
        "type": np.array([classes.name(t) for t in type_ids.tolist()], dtype=object),
        "type_id": type_ids,
        "probability": np.asarray(inst_probs)[ids].astype(np.float64),
    }


def nucleus_outlines(
    inst: np.ndarray, ids: np.ndarray, origin: Sequence[int] = (0, 0), scale: float = 1.0, tolerance: float = 0.0
) -> list[list]:
    """Each id's closed pixel-edge outline in input pixels, simplified to within `tolerance` model pixels."""
    rings = simplify_rings(label_outlines(inst, ids, (int(origin[0]), int(origin[1]))), tolerance)
    return rings if scale == 1 else [[[round(x * scale, 2), round(y * scale, 2)] for x, y in ring] for ring in rings]


def nucleus_features(table: dict[str, np.ndarray], outlines: list[list], classes: NucleusClasses) -> list:
    """One QuPath detection per row of `table`, with its outline, class and the record's main measurements."""
    features = []
    for i, ring in enumerate(outlines):
        nucleus_id = int(table["nucleus_id"][i])
        measurements = {
            "Nucleus id": nucleus_id,
            "Type probability": round(float(table["probability"][i]), 4),
            "Area px": round(float(table["area_px"][i]), 2),
            "Area µm^2": round(float(table["area_um2"][i]), 3),
        }
        type_id = int(table["type_id"][i])
        features.append(qupath_detection(nucleus_id, ring, type_id, measurements, {"nucleus_id": nucleus_id}, classes))
    return features


def renumber_feature(feature: dict, nucleus_id: int) -> dict:
    """A detection made by `nucleus_features` given another id (everywhere the id appears)."""
    feature["id"] = feature["properties"]["nucleus_id"] = nucleus_id
    feature["properties"]["measurements"]["Nucleus id"] = nucleus_id
    return feature


def renumber(table: dict[str, np.ndarray], first: int) -> dict[str, np.ndarray]:
    """The table with nucleus ids first, first + 1, ... (a slide numbers its nuclei across tiles)."""
    return {**table, "nucleus_id": np.arange(first, first + len(table["nucleus_id"]), dtype=np.int64)}


def csv_lines(table: dict[str, np.ndarray]) -> list[str]:
    """The rows of `table` as CSV lines in `NUCLEUS_COLUMNS` order (text cells spreadsheet-safe), each ending in
    a newline."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    columns = [table[name].tolist() for name in NUCLEUS_COLUMNS]
    for row in zip(*columns, strict=True):
        writer.writerow(
            [
                format(value, _FORMATS[name]) if name in _FORMATS else spreadsheet_safe(value)
                for name, value in zip(NUCLEUS_COLUMNS, row, strict=True)
            ]
        )
    return buffer.getvalue().splitlines(keepends=True)


def csv_type_id(line: str) -> int:
    """The type id of one CSV line, read by column name (a class name may hold a quoted comma)."""
    return int(next(csv.reader([line]))[TYPE_ID_COLUMN])


def feature_text(feature: dict) -> str:
    """One GeoJSON feature as the compact line a nuclei GeoJSON file holds."""
    return json.dumps(feature, separators=(",", ":"), ensure_ascii=False)


def geojson_text(features: Sequence[dict]) -> str:
    """A nuclei GeoJSON file's whole text: the head, one feature per line, the tail (as a slide's file grows)."""
    return GEOJSON_HEAD + ",\n".join(feature_text(f) for f in features) + GEOJSON_TAIL


def write_nuclei_geojson(path: str | os.PathLike, features: Sequence[dict], overwrite: bool = False) -> Path:
    """The detections of `nucleus_features` as a QuPath GeoJSON file (File > Import objects, or drag and drop)."""
    return write_text(path, geojson_text(features), overwrite)


def write_nuclei_csv(path: str | os.PathLike, table: dict[str, np.ndarray], overwrite: bool = False) -> Path:
    """The record table as CSV: the header, then one line per nucleus."""
    return write_text(path, CSV_HEADER + "".join(csv_lines(table)), overwrite)
