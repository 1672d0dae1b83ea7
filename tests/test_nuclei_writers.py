"""Writers of inference output: GeoJSON that QuPath imports, CSV, lossless label maps, overlay, no silent overwrite."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage

from scripts.core.classes import PANNUKE
from scripts.core.qupath import label_outlines, outline_polygon
from scripts.workflows.predict.nuclei_writers import (
    overlay_image,
    overlay_png,
    write_label_nifti,
    write_label_tiff,
)
from scripts.workflows.predict.nucleus_record import (
    NUCLEUS_COLUMNS,
    nucleus_features,
    nucleus_outlines,
    nucleus_table,
    write_nuclei_csv,
    write_nuclei_geojson,
)
from scripts.data.pannuke.format import TYPE_COLOURS, TYPE_NAMES

H, W = 48, 80  # non-square so a swapped x/y would leave the image


def instances_to_geojson(inst, types, probs, tolerance=0.0) -> dict:
    """The detections of an image analysed whole, as its GeoJSON file holds them (ids = label-map ids)."""
    table = nucleus_table(inst, types, probs, PANNUKE)
    outlines = nucleus_outlines(inst, table["nucleus_id"], tolerance=tolerance)
    return {"type": "FeatureCollection", "features": nucleus_features(table, outlines, PANNUKE)}


def _shoelace(ring: list[list[int]]) -> float:
    x = np.array([p[0] for p in ring], dtype=float)
    y = np.array([p[1] for p in ring], dtype=float)
    return 0.5 * float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]))


@pytest.fixture()
def sample() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Four nuclei: a wide off-centre box, a 1-pixel nucleus, one with a hole, one in two parts; ids not contiguous."""
    inst = np.zeros((H, W), dtype=np.int32)
    inst[5:9, 60:75] = 2  # rows 5-8, columns 60-74: far right, near the top
    inst[40, 3] = 4  # single pixel, bottom left
    inst[20:30, 20:30] = 7
    inst[24:26, 24:26] = 0  # hole
    inst[35:40, 40:45] = 9
    inst[44:46, 50:52] = 9  # second, smaller part of id 9
    types = np.zeros(10, dtype=np.uint8)
    types[[2, 4, 7, 9]] = [1, 2, 5, 3]
    probs = np.zeros(10, dtype=np.float32)
    probs[[2, 4, 7, 9]] = [0.9, 0.6, 0.75, 0.5]
    rng = np.random.default_rng(0)
    image = rng.integers(0, 200, size=(H, W, 3), dtype=np.uint8)
    return inst, types, probs, image


def test_geojson_features_follow_qupath_conventions(sample) -> None:
    inst, types, probs, _ = sample
    fc = instances_to_geojson(inst, types, probs)
    assert fc["type"] == "FeatureCollection"
    feats = {f["properties"]["nucleus_id"]: f for f in fc["features"]}
    assert sorted(feats) == [2, 4, 7, 9]
    for nucleus_id, f in feats.items():
        assert f["type"] == "Feature" and f["id"] == nucleus_id
        assert f["geometry"]["type"] == "Polygon"
        ring = f["geometry"]["coordinates"][0]
        assert len(f["geometry"]["coordinates"]) == 1
        assert ring[0] == ring[-1] and len(ring) >= 4
        xs, ys = [p[0] for p in ring], [p[1] for p in ring]
        assert 0 <= min(xs) and max(xs) <= W and 0 <= min(ys) and max(ys) <= H
        props = f["properties"]
        assert props["objectType"] == "detection"
        t = int(types[nucleus_id])
        assert props["classification"] == {"name": TYPE_NAMES[t - 1], "color": list(TYPE_COLOURS[t - 1])}
        assert props["measurements"]["Type probability"] == pytest.approx(float(probs[nucleus_id]))
        assert props["measurements"]["Area px"] == int((inst == nucleus_id).sum())
    json.dumps(fc)  # plain JSON types only


def test_geojson_x_is_column_and_y_is_row(sample) -> None:
    inst, types, probs, _ = sample
    ring = {f["id"]: f["geometry"]["coordinates"][0] for f in instances_to_geojson(inst, types, probs)["features"]}
    box = ring[2]
    assert (min(p[0] for p in box), max(p[0] for p in box)) == (60, 75)  # columns 60..74, pixel edges
    assert (min(p[1] for p in box), max(p[1] for p in box)) == (5, 9)  # rows 5..8
    assert ring[4][:-1] == [[3, 40], [4, 40], [4, 41], [3, 41]]  # 1-pixel nucleus: its unit square


def test_outline_area_matches_pixels_and_is_counter_clockwise(sample) -> None:
    inst, types, probs, _ = sample
    ring = {f["id"]: f["geometry"]["coordinates"][0] for f in instances_to_geojson(inst, types, probs)["features"]}
    assert _shoelace(ring[2]) == 4 * 15
    assert _shoelace(ring[7]) == 100  # hole filled
    assert _shoelace(ring[9]) == 25  # largest part only
    rng = np.random.default_rng(3)
    for _ in range(200):
        blob = rng.random((8, 8)) < 0.6
        labels, n = ndimage.label(blob)
        if n:
            biggest = ndimage.binary_fill_holes(labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1)
            assert _shoelace(outline_polygon(blob)) == biggest.sum()


def test_label_outlines_are_outline_polygon_of_each_id_on_any_label_map() -> None:
    """The whole-map tracer gives exactly the per-mask rings, on touching nuclei and on every shape the per-mask
    path has to clean first (pieces, holes, pixels touching at a corner only), for all ids or a subset."""
    rng = np.random.default_rng(5)
    for trial in range(200):
        shape = tuple(rng.integers(4, 40, 2))
        if trial % 2:
            labels = ndimage.label(rng.random(shape) < 0.55)[0]  # separate blobs, many with holes and pinches
        else:
            labels = rng.integers(0, 5, shape) * (rng.random(shape) < 0.9)  # touching ids in several pieces
        ids = np.unique(labels)[1:]
        boxes = ndimage.find_objects(labels)
        expected = {
            i: outline_polygon(labels[boxes[i - 1]] == i, (boxes[i - 1][1].start + 3, boxes[i - 1][0].start + 4))
            for i in ids.tolist()
        }
        assert label_outlines(labels, ids, (3, 4)) == [expected[i] for i in ids.tolist()]
        subset = ids[rng.random(len(ids)) < 0.5]
        assert label_outlines(labels, subset, (3, 4)) == [expected[i] for i in subset.tolist()]


def test_geojson_rejects_bad_types(sample) -> None:
    inst, types, probs, _ = sample
    types = types.copy()
    types[7] = 0
    with pytest.raises(ValueError, match=r"ids \[7\]"):
        instances_to_geojson(inst, types, probs)
    with pytest.raises(ValueError, match="inst_types"):
        instances_to_geojson(inst, types[:5], probs)


def test_empty_image_gives_empty_outputs(tmp_path) -> None:
    inst = np.zeros((10, 12), dtype=np.int32)
    empty = np.zeros(1, dtype=np.uint8)
    assert instances_to_geojson(inst, empty, empty.astype(np.float32))["features"] == []
    write_nuclei_csv(tmp_path / "e.csv", nucleus_table(inst, empty, empty.astype(np.float32), PANNUKE))
    assert len((tmp_path / "e.csv").read_text().splitlines()) == 1


def test_write_geojson_reloads(sample, tmp_path) -> None:
    inst, types, probs, _ = sample
    fc = instances_to_geojson(inst, types, probs)
    path = write_nuclei_geojson(tmp_path / "out" / "nuclei.geojson", fc["features"])
    assert json.loads(path.read_text(encoding="utf-8")) == fc
    write_nuclei_geojson(tmp_path / "none.geojson", [])
    assert json.loads((tmp_path / "none.geojson").read_text()) == {"type": "FeatureCollection", "features": []}


def test_measurements_csv(sample, tmp_path) -> None:
    inst, types, probs, _ = sample
    table = nucleus_table(inst, types, probs, PANNUKE)
    write_nuclei_csv(tmp_path / "m.csv", table)
    with open(tmp_path / "m.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == NUCLEUS_COLUMNS
    assert [int(r["nucleus_id"]) for r in rows] == [2, 4, 7, 9]
    by_id = {int(r["nucleus_id"]): r for r in rows}
    assert float(by_id[2]["area_px"]) == 60 and float(by_id[4]["area_px"]) == 1 and float(by_id[7]["area_px"]) == 96
    assert float(by_id[2]["area_um2"]) == pytest.approx(60 * 0.25**2, abs=0.01)
    # pixel-edge convention, as the GeoJSON and QuPath: pixel (r, c) has its centre at (c + 0.5, r + 0.5)
    assert float(by_id[2]["x_px"]) == pytest.approx(67.5)  # mean column of 60..74, plus half a pixel
    assert float(by_id[2]["y_px"]) == pytest.approx(7.0)  # mean row of 5..8
    assert float(by_id[2]["x_um"]) == pytest.approx(67.5 * 0.25, abs=1e-3)
    assert (float(by_id[4]["x_px"]), float(by_id[4]["y_px"])) == (3.5, 40.5)
    assert by_id[7]["type"] == TYPE_NAMES[4] and int(by_id[7]["type_id"]) == 5
    assert float(by_id[9]["probability"]) == pytest.approx(0.5)
    assert float(by_id[2]["eccentricity"]) > 0.8  # 4 x 15 box is elongated
    assert float(by_id[2]["perimeter_px"]) > 0


def test_label_tiff_round_trips_exactly(sample, tmp_path) -> None:
    inst, *_ = sample
    back = tifffile.imread(write_label_tiff(tmp_path / "l.tif", inst))
    assert back.dtype == np.uint16 and np.array_equal(back, inst)
    big = inst.astype(np.int64) * 10_000  # max id 90000 needs uint32
    back = tifffile.imread(write_label_tiff(tmp_path / "big.tif", big))
    assert back.dtype == np.uint32 and np.array_equal(back, big)
    with tifffile.TiffFile(tmp_path / "l.tif") as tif:
        assert tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE


def test_label_nifti_round_trips(sample, tmp_path) -> None:
    inst, *_ = sample
    for name in ("l.nii.gz", "l.nii"):
        img = nib.load(write_label_nifti(tmp_path / name, inst))
        back = np.asarray(img.dataobj).T
        assert img.shape == (W, H) and np.issubdtype(back.dtype, np.integer)
        assert np.array_equal(back, inst)
    with pytest.raises(ValueError, match=r"\.nii"):
        write_label_nifti(tmp_path / "l.png", inst)


def test_overlay_png_draws_type_colours(sample, tmp_path) -> None:
    inst, types, probs, image = sample
    image = image.copy()
    image[inst > 0] = (0, 0, 0)  # make drawn outlines unmistakable
    drawn = np.asarray(Image.open(overlay_png(tmp_path / "o.png", image, inst, types)))
    assert drawn.shape == (H, W, 3) and drawn.dtype == np.uint8
    assert tuple(drawn[5, 65]) == TYPE_COLOURS[0]  # top edge of id 2 (Neoplastic)
    assert tuple(drawn[25, 20]) == TYPE_COLOURS[4]  # left edge of id 7 (Epithelial)
    assert tuple(drawn[40, 3]) == TYPE_COLOURS[1]  # the 1-pixel nucleus
    assert tuple(drawn[7, 65]) == (0, 0, 0)  # interior untouched
    assert np.array_equal(drawn[inst == 0], image[inst == 0])  # background untouched
    assert np.array_equal(drawn, overlay_image(image, inst, types))
    with pytest.raises(ValueError, match="same size"):
        overlay_image(image[:-1], inst, types)


def test_writers_refuse_to_overwrite(sample, tmp_path) -> None:
    inst, types, probs, image = sample
    fc = instances_to_geojson(inst, types, probs)
    table = nucleus_table(inst, types, probs, PANNUKE)
    writers = {
        "a.tif": lambda p, **kw: write_label_tiff(p, inst, **kw),
        "a.nii.gz": lambda p, **kw: write_label_nifti(p, inst, **kw),
        "a.geojson": lambda p, **kw: write_nuclei_geojson(p, fc["features"], **kw),
        "a.csv": lambda p, **kw: write_nuclei_csv(p, table, **kw),
        "a.png": lambda p, **kw: overlay_png(p, image, inst, types, **kw),
    }
    for name, write in writers.items():
        path = tmp_path / name
        path.write_bytes(b"keep me")
        with pytest.raises(FileExistsError, match=rf"{name}.*overwrite=True"):
            write(path)
        assert path.read_bytes() == b"keep me"
        write(path, overwrite=True)
        assert path.read_bytes() != b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(writers)  # no temp files left behind


def test_outlines_can_be_simplified_to_within_a_pixel() -> None:
    from skimage.draw import disk
    from skimage.measure import points_in_poly

    inst = np.zeros((64, 64), np.int32)
    inst[disk((32, 30), 12)] = 1
    types, probs = np.array([0, 3]), np.array([0.0, 0.8], np.float32)
    exact = instances_to_geojson(inst, types, probs)["features"][0]["geometry"]["coordinates"][0]
    simple = instances_to_geojson(inst, types, probs, tolerance=1.0)["features"][0]["geometry"]["coordinates"][0]
    assert simple[0] == simple[-1] and len(simple) < len(exact) / 3
    # every vertex of the exact outline lies within about a pixel of the simplified one: pixel centres agree
    rows, cols = np.nonzero(inst)
    inside = points_in_poly(np.stack([cols + 0.5, rows + 0.5], 1), np.asarray(simple, float))
    assert inside.mean() > 0.95


def test_record_measures_are_skimage_regionprops_for_every_nucleus_at_once():
    """Touching nuclei, nuclei cut by the tile edge, one-pixel and thin ones: the same figures as regionprops."""
    from skimage.measure import regionprops_table

    from scripts.data.pannuke.cache import masks_to_instances
    from scripts.data.pannuke.demo_data import make_tile
    from scripts.workflows.predict.nucleus_record import region_measures

    _, masks = make_tile(np.random.default_rng(11))
    inst = masks_to_instances(masks)[0].astype(np.int64)
    inst[0, :7] = inst.max() + 1  # a one-pixel-high nucleus on the top edge
    inst[200, 200] = inst.max() + 1  # a single pixel
    assert len(np.unique(inst)) > 25
    expected = regionprops_table(inst, properties=("label", "centroid", "area", "perimeter", "eccentricity"))
    found = region_measures(inst)
    for key, values in expected.items():
        np.testing.assert_allclose(found[key], values, rtol=1e-9, atol=1e-9, err_msg=key)
    assert all(len(v) == 0 for v in region_measures(np.zeros((8, 8), np.int64)).values())
