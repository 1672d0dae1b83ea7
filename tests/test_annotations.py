"""QuPath GeoJSON exports as training data: parsing, rasterising, and the converter's --annotations path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scripts.core.classes import CLASSES_FILE, read_dataset_classes
from scripts.core.errors import DataError
from scripts.data.pannuke.annotations import annotations_geojson, parse_geojson, rasterise
from scripts.data.pannuke.convert import main

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def square(x: float, y: float, size: float) -> list[list[float]]:
    return [[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]


def feature(rings, name=None, kind="Polygon", object_type="annotation", colour=None) -> dict:
    props = {"objectType": object_type}
    if name is not None:
        props["classification"] = {"name": name, **({"color": colour} if colour else {})}
    coords = rings if kind == "Polygon" else [rings]
    return {"type": "Feature", "geometry": {"type": kind, "coordinates": coords}, "properties": props}


def write(path: Path, value) -> Path:
    path.write_text(json.dumps(value))
    return path


def parse_value(tmp_path: Path, value) -> tuple:
    nuclei, stats = parse_geojson(write(tmp_path / "a.geojson", value))
    return nuclei, stats


def test_polygon_pixels_follow_qupath_convention(tmp_path):
    nuclei, _ = parse_value(tmp_path, [feature([square(2, 3, 4)], "Tumour")])
    inst, source, stats = rasterise(nuclei, (12, 12))
    expected = np.zeros((12, 12), np.uint32)
    expected[3:7, 2:6] = 1  # pixel centres inside x in [2, 6], y in [3, 7]
    np.testing.assert_array_equal(inst, expected)
    assert source == [0] and nuclei[0].name == "Tumour" and stats.clipped == 0


def test_holes_and_multipolygon(tmp_path):
    ring_with_hole = [square(0, 0, 10), square(3, 3, 4)]
    multi = {
        "type": "Feature",
        "geometry": {"type": "MultiPolygon", "coordinates": [[square(12, 0, 3)], [square(16, 0, 3)]]},
        "properties": {"objectType": "detection", "classification": {"name": "Lymph"}},
    }
    nuclei, _ = parse_value(tmp_path, {"type": "FeatureCollection", "features": [feature(ring_with_hole, "T"), multi]})
    inst, _, _ = rasterise(nuclei, (20, 20))
    assert (inst == 1).sum() == 100 - 16 and not inst[3:7, 3:7].any()
    assert (inst == 2).sum() == 18 and inst[0, 12] == 2 and inst[0, 17] == 2


def test_cells_use_their_nucleus_geometry(tmp_path):
    cell = feature([square(0, 0, 10)], "T", object_type="cell")
    cell["nucleusGeometry"] = {"type": "Polygon", "coordinates": [square(2, 2, 3)]}
    nuclei, _ = parse_value(tmp_path, [cell])
    inst, _, _ = rasterise(nuclei, (12, 12))
    assert (inst > 0).sum() == 9


def test_outside_and_partly_outside_objects_are_clipped_and_counted(tmp_path):
    nuclei, _ = parse_value(tmp_path, [feature([square(-2, -2, 4)], "T"), feature([square(50, 50, 4)], "T")])
    inst, source, stats = rasterise(nuclei, (10, 10))
    assert (inst == 1).sum() == 4 and source == [0]
    assert stats.clipped == 1 and stats.outside == 1


def test_overlaps_resolved_smaller_on_top_deterministically(tmp_path):
    big, small = feature([square(0, 0, 10)], "A"), feature([square(2, 2, 3)], "B")
    hidden = feature([square(2, 2, 3)], "A")  # the same pixels again, later in the file: loses every pixel
    for order in ([big, small, hidden], [small, big, hidden]):
        nuclei, _ = parse_value(tmp_path, order)
        inst, source, stats = rasterise(nuclei, (12, 12))
        names = [nuclei[i].name for i in source]
        assert sorted(names) == ["A", "B"] and stats.overlapping == 2 and stats.hidden == 1
        small_id = names.index("B") + 1
        assert (inst == small_id).sum() == 9 and (inst > 0).sum() == 100


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "an empty file"),
        ("  \n", "an empty file"),
        ("{not json", "not valid JSON"),
        ('{"type": "Topology"}', "not GeoJSON"),
        ('[{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]}}]', "malformed"),
        ('[{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, "a"], [2, 2]]]}}]', "ring"),
        ('[{"type": "Feature", "properties": {}}]', "no geometry"),
        ('[{"type": "Point"}]', "not a GeoJSON Feature"),
    ],
)
def test_bad_files_are_one_error_naming_the_file(tmp_path, text, message):
    path = tmp_path / "slide_7.geojson"
    path.write_text(text)
    with pytest.raises(DataError, match=message) as err:
        parse_geojson(path)
    assert str(path) in str(err.value) and "Export objects as GeoJSON" in str(err.value)


@pytest.mark.parametrize("text", ['{"type": "FeatureCollection", "features": []}', "[]"])
def test_an_image_annotated_with_no_nucleus_is_kept_and_counted(tmp_path, text):
    path = tmp_path / "glass.geojson"
    path.write_text(text)
    nuclei, stats = parse_geojson(path)
    assert nuclei == [] and stats.empty_images == 1
    inst, source, _ = rasterise(nuclei, (8, 8))
    assert not inst.any() and source == []


def test_points_and_area_classes_are_ignored_and_counted(tmp_path):
    point = {"type": "Feature", "geometry": {"type": "Point", "coordinates": [3, 3]}, "properties": {}}
    region = feature([square(0, 0, 50)], "Region*")
    nuclei, stats = parse_value(tmp_path, [point, region, feature([square(1, 1, 3)], "T")])
    assert len(nuclei) == 1 and stats.not_polygons == {"Point": 1} and stats.areas_ignored == 1


# ---------------------------------------------------------------- the converter


def lab_images(root: Path, features_per_image: list[list[dict]], shape=(300, 280)) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "geojson").mkdir()
    rng = np.random.default_rng(0)
    for k, features in enumerate(features_per_image):
        image = rng.integers(0, 230, size=(*shape, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / "images" / f"img{k}.png")
        write(root / "geojson" / f"img{k}.geojson", {"type": "FeatureCollection", "features": features})
    return root


def convert(root: Path, *extra: str) -> int:
    args = ["--images", str(root / "images"), "--annotations", str(root / "geojson"), "--output_dir", str(root / "out")]
    return main([*args, *extra])


def test_converter_writes_the_lab_classes_with_the_folds(tmp_path, capsys):
    red = [200, 0, 0]
    feats = [
        [feature([square(10, 10, 8)], "Tumour", colour=red), feature([square(40, 40, 6)], "Lymphocyte")],
        [feature([square(100, 250, 30)], "Tumour", colour=red), feature([square(5, 5, 5)], "Lymphocyte")],
    ]
    root = lab_images(tmp_path, feats)
    assert convert(root, "--fold", "1") == 0
    classes = read_dataset_classes(root / "out")
    assert classes.names == ("Lymphocyte", "Tumour")
    masks = np.load(root / "out" / "Fold 1" / "masks" / "fold1" / "masks.npy")
    assert masks.shape == (8, 256, 256, 3)  # 300x280 -> 2x2 overlapping tiles each; 2 classes + background
    assert masks[0, 10:18, 10:18, 1].all() and masks[0, 40:46, 40:46, 0].all()
    # the object at x 250-280, y 100-130 of the second image is clipped by tile edges and kept in each tile
    assert masks[4:, ..., 1].max(axis=(1, 2)).astype(bool).sum() == 4
    log = capsys.readouterr().out
    assert "classes: Lymphocyte, Tumour" in log and "Lymphocyte 5" in log
    # a second fold with the same list is accepted; another list is refused, naming both
    assert convert(root, "--fold", "2") == 0
    feats_other = [[feature([square(10, 10, 8)], "Stroma")]]
    other = lab_images(tmp_path / "other", feats_other)
    assert main(["--images", str(other / "images"), "--annotations", str(other / "geojson"),
                 "--output_dir", str(root / "out"), "--fold", "3"]) == 2  # fmt: skip
    assert "pass --classes" in capsys.readouterr().err


def test_unclassified_objects(tmp_path, capsys):
    only = lab_images(tmp_path / "a", [[feature([square(10, 10, 8)]), feature([square(30, 30, 8)])]])
    assert convert(only, "--fold", "1") == 0
    assert read_dataset_classes(only / "out").names == ("Nucleus",)
    assert "'Nucleus'" in capsys.readouterr().out
    mixed = lab_images(tmp_path / "b", [[feature([square(10, 10, 8)], "Tumour"), feature([square(30, 30, 8)])]])
    assert convert(mixed, "--fold", "1") == 2
    err = capsys.readouterr().err
    assert "1 objects have no classification" in err and "--unclassified" in err and "img0.geojson" in err
    assert convert(mixed, "--fold", "1", "--unclassified", "Other") == 0
    assert read_dataset_classes(mixed / "out").names == ("Other", "Tumour")


def test_bad_annotation_file_is_named_and_nothing_is_written(tmp_path, capsys):
    root = lab_images(tmp_path, [[feature([square(10, 10, 8)], "T")], [feature([square(10, 10, 8)], "T")]])
    (root / "geojson" / "img1.geojson").write_text("{")
    assert convert(root, "--fold", "1") == 2
    err = capsys.readouterr().err
    assert "img1.geojson: not valid JSON" in err and not (root / "out" / "Fold 1").exists()
    (root / "geojson" / "img1.geojson").unlink()
    assert convert(root, "--fold", "1") == 2
    assert "no annotations named img1.{geojson,json}" in capsys.readouterr().err


def test_explicit_class_list_orders_the_channels(tmp_path):
    root = lab_images(tmp_path, [[feature([square(10, 10, 8)], "B"), feature([square(30, 30, 8)], "A")]])
    assert convert(root, "--fold", "1", "--classes", "B,A,C") == 0
    assert read_dataset_classes(root / "out").names == ("B", "A", "C")
    masks = np.load(root / "out" / "Fold 1" / "masks" / "fold1" / "masks.npy")
    assert masks[0, 12, 12, 0] > 0 and masks[0, 32, 32, 1] > 0 and masks.shape[-1] == 4
    assert convert(root, "--fold", "1", "--overwrite", "--classes", "A") == 2


@pytest.mark.skipif(not (SHARED / "consep").is_dir(), reason="needs ../shared/data")
def test_real_labels_round_trip_through_qupath_geojson(tmp_path):
    """Real CoNSeP labels written as QuPath annotations come back as the same nuclei, pixel for pixel."""
    label = np.load(sorted((SHARED / "consep" / "test" / "labels").glob("*.npz"))[0])
    inst, types = label["inst_map"], label["type_map"]
    names = {i: "TIS"[int(np.bincount(types[inst == i]).argmax()) % 3] for i in np.unique(inst[inst > 0]).tolist()}
    path = write(tmp_path / "x.geojson", annotations_geojson(inst, names))
    nuclei, _ = parse_geojson(path)
    back, source, stats = rasterise(nuclei, inst.shape)
    assert len(nuclei) == len(names) and stats.hidden == 0
    pairs = {(int(a), int(b)) for a, b in zip(inst[inst > 0], back[inst > 0], strict=True)}
    assert len(pairs) == len(names) and ((back > 0) == (inst > 0)).all()
    assert [nuclei[i].name for i in source] == [names[i] for i in sorted(names)]
    assert (tmp_path / CLASSES_FILE).exists() is False
