"""The README's whole-slide command on generated pyramidal OME-TIFFs, an Aperio SVS and a DICOM folder: QuPath-readable
outputs, the same nuclei as tile inference on the same pixels, finished slides skipped, a corrupt slide reported while
the next one runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from bundle_launch import run_bundle
from PIL import Image
from slide_fixtures import write_dicom_slide, write_slide

from scripts.data.pannuke.format import TYPE_COLOURS, TYPE_NAMES

pytestmark = pytest.mark.slow

WSI = ["train.json", "inference.json", "inference_wsi.json"]
TILES = ["train.json", "inference.json"]


@pytest.fixture(scope="module")
def slide_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("wsi")
    # tissue reaches the right edge, so the last column's tiles (a 256-px core) batch with full ones
    pixels = write_slide(work / "slides" / "case.ome.tif", size=(1280, 1280), tissue=(256, 256, 1280, 1024))
    (work / "slides" / "broken.svs").write_bytes(b"II*\x00" + bytes(300))
    write_dicom_slide(work / "slides" / "case_dicom", pixels, mpp=0.25, levels=2)  # the same pixels as DICOM
    proc = run_bundle(
        "run",
        WSI,
        work,
        "--input_dir",
        str(work / "slides"),
        "--tile_size",
        "512",
        "--num_workers",
        "1",
        "--tiles_per_batch",
        "2",
        check=False,
    )
    return work, proc


def test_a_corrupt_slide_is_reported_and_the_good_one_finished(slide_run):
    work, proc = slide_run
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "1 of 3 slides failed" in log and "broken.svs: not a slide" in log
    assert "Traceback" not in proc.stderr
    assert (work / "eval" / "case" / "case_summary.json").is_file()


def test_outputs_follow_qupath_rules_and_the_summary_adds_up(slide_run):
    work, _ = slide_run
    folder = work / "eval" / "case"
    fc = json.loads((folder / "case_nuclei.geojson").read_text())
    summary = json.loads((folder / "case_summary.json").read_text())
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == summary["nuclei"] > 50
    vertices = []
    for f in fc["features"]:
        ring = f["geometry"]["coordinates"][0]
        assert f["geometry"]["type"] == "Polygon" and ring[0] == ring[-1] and len(ring) >= 4
        assert all(0 <= x <= 1280 and 0 <= y <= 1280 for x, y in ring)  # level-0 pixels
        props = f["properties"]
        assert props["objectType"] == "detection"
        name = props["classification"]["name"]
        assert props["classification"]["color"] == list(TYPE_COLOURS[TYPE_NAMES.index(name)])
        assert 0 <= props["measurements"]["Type probability"] <= 1 and props["measurements"]["Area µm^2"] > 0
        vertices.append(len(ring))
    assert np.mean(vertices) < 30  # simplified outlines, not every pixel step
    assert sum(summary["nuclei_per_type"].values()) == summary["nuclei"]
    assert summary["tissue_mm2"] == pytest.approx(1024 * 768 * 0.25**2 / 1e6, rel=0.15)
    rows = (folder / "case_nuclei.csv").read_text().splitlines()
    assert rows[0].startswith("nucleus_id,x_px,y_px,x_um,y_um,area_px,area_um2") and len(rows) == summary["nuclei"] + 1
    for png in ("case_tissue.png", "case_overlay.png"):
        assert Image.open(folder / png).size[0] > 100


def centroids(rows: list[str]) -> np.ndarray:
    """(n, 2) level-0 centroids from the rows of a nuclei CSV (header first)."""
    return np.array([[float(v) for v in row.split(",")[1:3]] for row in rows[1:]]).reshape(-1, 2)


def tile_inference_rows(work, name: str, decoded: np.ndarray, folder) -> list[str]:
    """The nuclei CSV lines (header first) of the README's tile inference on `decoded`, saved as `<name>.png`."""
    (folder / "png").mkdir(parents=True)
    Image.fromarray(decoded).save(folder / "png" / f"{name}.png")
    run_bundle("run", TILES, work, "--input_dir", str(folder / "png"), "--output_dir", str(folder / "out"))
    return (folder / "out" / name / f"{name}_nuclei.csv").read_text().splitlines()


def agree_with_tile_inference(work, name: str, decoded: np.ndarray, folder) -> None:
    """The slide `name`'s nuclei against tile inference on the pixels its file holds (decoded by its own library,
    not the bundle's reader, so compression is the same on both sides): the same columns, counts within 2 %, the same
    nuclei in the same place."""
    from scipy.spatial import cKDTree

    tile_csv = tile_inference_rows(work, name, decoded, folder)
    slide_csv = (work / "eval" / name / f"{name}_nuclei.csv").read_text().splitlines()
    assert tile_csv[0] == slide_csv[0]  # one nucleus record: the same columns
    tile_geojson = (folder / "out" / name / f"{name}_nuclei.geojson").read_text()
    slide_geojson = (work / "eval" / name / f"{name}_nuclei.geojson").read_text()
    lines = [text.splitlines() for text in (tile_geojson, slide_geojson)]
    assert lines[0][0] == lines[1][0] and lines[0][-1] == lines[1][-1]  # one GeoJSON text: a feature per line
    assert len(lines[0]) - 2 == len(json.loads(tile_geojson)["features"])
    tile_count = len(json.loads(tile_geojson)["features"])
    slide_count = json.loads((work / "eval" / name / f"{name}_summary.json").read_text())["nuclei"]
    assert len(tile_csv) - 1 == tile_count and len(slide_csv) - 1 == slide_count
    assert abs(slide_count - tile_count) <= 0.02 * tile_count, (slide_count, tile_count)
    distance, _ = cKDTree(centroids(tile_csv)).query(centroids(slide_csv))
    assert np.median(distance) <= 0.5 and np.mean(distance < 2) > 0.9  # the same centroid convention


def test_slide_nuclei_agree_with_tile_inference_on_the_same_pixels(slide_run, tmp_path):
    import tifffile

    work, _ = slide_run
    agree_with_tile_inference(work, "case", tifffile.imread(work / "slides" / "case.ome.tif"), tmp_path / "tiles")


def test_a_field_up_to_one_window_gives_exactly_the_nuclei_of_tile_inference(tmp_path):
    """A 1000 x 900 field is one window in both workflows (never padded with glass) and one tile of the one writer,
    so the slide's CSV and GeoJSON are the image's, byte for byte."""
    import tifffile

    write_slide(tmp_path / "slides" / "field.ome.tif", size=(1000, 900), tissue=(0, 0, 1000, 900), seed=2)
    run_bundle("run", WSI, tmp_path, "--input_dir", str(tmp_path / "slides"))
    decoded = tifffile.imread(tmp_path / "slides" / "field.ome.tif")
    tile_rows = tile_inference_rows(tmp_path, "field", decoded, tmp_path / "tiles")
    slide_rows = (tmp_path / "eval" / "field" / "field_nuclei.csv").read_text().splitlines()
    assert len(tile_rows) > 50 and slide_rows == tile_rows
    geojson = [
        (folder / "field" / "field_nuclei.geojson").read_text()
        for folder in (tmp_path / "eval", tmp_path / "tiles" / "out")
    ]
    assert geojson[0] == geojson[1]  # one writer: the same file, byte for byte


def test_a_dicom_folder_is_read_like_the_same_pixels_in_a_tiff(slide_run, tmp_path):
    import openslide

    work, _ = slide_run
    tiff = json.loads((work / "eval" / "case" / "case_summary.json").read_text())
    dicom = json.loads((work / "eval" / "case_dicom" / "case_dicom_summary.json").read_text())
    assert dicom["reader"] == "openslide" and dicom["mpp"] == 0.25 and dicom["tiles"] == tiff["tiles"]
    # its frames are JPEG-compressed apart from the TIFF's: scored against the pixels the DICOM itself holds
    handle = openslide.OpenSlide(str(next((work / "slides" / "case_dicom").iterdir())))
    decoded = np.asarray(handle.read_region((0, 0), 0, handle.dimensions).convert("RGB"))
    agree_with_tile_inference(work, "case_dicom", decoded, tmp_path / "tiles")


def test_a_finished_slide_is_skipped_on_rerun(slide_run):
    work, _ = slide_run
    summary = work / "eval" / "case" / "case_summary.json"
    stamp = summary.stat().st_mtime_ns
    proc = run_bundle("run", WSI, work, "--input_dir", str(work / "slides" / "case.ome.tif"), "--num_workers", "0")
    assert "finished earlier" in proc.stdout + proc.stderr and summary.stat().st_mtime_ns == stamp


def _one_and_two_processes(tmp_path) -> str:
    """Run the slides of tmp_path/slides alone into one_out and on 2 torchrun ranks into two_out; the 2-rank log."""
    from bundle_launch import launch

    common = ("--input_dir", str(tmp_path / "slides"), "--tile_size", "256", "--num_workers", "0")
    launch("run", WSI, tmp_path / "one", *common, "--output_dir", str(tmp_path / "one_out"))
    two = [*WSI, "multi_gpu_inference.json"]
    return launch("run", two, tmp_path / "two", *common, "--output_dir", str(tmp_path / "two_out"), ranks=2)


def test_two_torchrun_processes_write_what_one_process_writes(tmp_path):
    """The tiles of every slide (here one with 9 tiles, one with 1) are shared out across ranks and put back
    together in tile order: the files are byte for byte those a single process writes."""
    write_slide(tmp_path / "slides" / "big.ome.tif", size=(1024, 1024), tissue=(128, 128, 896, 896), seed=1)
    write_slide(tmp_path / "slides" / "small.ome.tif", size=(768, 768), tissue=(256, 256, 512, 512), seed=2)
    log = _one_and_two_processes(tmp_path)
    assert "to do on rank 0 of 2" in log
    for name in ("big", "small"):
        for suffix in ("_nuclei.geojson", "_nuclei.csv"):
            path = f"{name}/{name}{suffix}"
            assert (tmp_path / "two_out" / path).read_bytes() == (tmp_path / "one_out" / path).read_bytes(), path
        one = json.loads((tmp_path / "one_out" / name / f"{name}_summary.json").read_text())
        two = json.loads((tmp_path / "two_out" / name / f"{name}_summary.json").read_text())
        assert one["nuclei_per_type"] == two["nuclei_per_type"] and one["tiles"] == two["tiles"]
        assert not list((tmp_path / "two_out" / name).glob(".*"))  # the ranks' partial files are merged away


def test_torchrun_ranks_stop_together_when_the_output_folder_is_held(tmp_path):
    """Rank 0 holds the output folder's lock for the job; when another run holds it, every rank stops before any
    work (the multi-GPU overlay's initialize used to leave the lock out)."""
    import json as _json
    import socket
    import subprocess
    import sys

    from bundle_launch import launch
    from scripts.core.locks import OUTPUT_LOCK

    write_slide(tmp_path / "slides" / "s.ome.tif", size=(512, 512), tissue=(128, 128, 384, 384), seed=4)
    out = tmp_path / "out"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (out / OUTPUT_LOCK).write_text(_json.dumps({"pid": other.pid, "host": socket.gethostname(), "command": "A"}))
        common = ("--input_dir", str(tmp_path / "slides"), "--num_workers", "0", "--output_dir", str(out))
        with pytest.raises(AssertionError, match=f"the output folder {out} is in use by another run .pid {other.pid}"):
            launch("run", [*WSI, "multi_gpu_inference.json"], tmp_path / "two", *common, ranks=2)
    finally:
        other.kill()
        other.wait()
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_LOCK]


def test_a_pool_of_post_processing_workers_writes_the_same_files(tmp_path):
    write_slide(tmp_path / "slides" / "s.ome.tif", size=(1024, 1024), tissue=(128, 128, 896, 896), seed=3)
    common = ("--input_dir", str(tmp_path / "slides"), "--tile_size", "256", "--num_workers", "0")
    run_bundle("run", WSI, tmp_path, *common, "--output_dir", str(tmp_path / "inline"))
    run_bundle("run", WSI, tmp_path, *common, "--output_dir", str(tmp_path / "pool"), "--postprocess_workers", "2")
    for suffix in ("_nuclei.geojson", "_nuclei.csv"):
        name = f"s/s{suffix}"
        assert (tmp_path / "pool" / name).read_bytes() == (tmp_path / "inline" / name).read_bytes(), name


def test_an_aperio_svs_runs_through_openslide_like_tile_inference(tmp_path):
    from slide_fixtures import write_aperio_slide

    (tmp_path / "slides").mkdir()
    write_aperio_slide(tmp_path / "slides" / "case.svs")
    # one tile as large as the slide: its window is the whole slide, as tile inference's is the whole image, so the
    # two differ only in how the pixels were read (seams between tiles are checked in the test with 512-px tiles)
    run_bundle("run", WSI, tmp_path, "--input_dir", str(tmp_path / "slides"), "--tile_size", "1280")
    summary = json.loads((tmp_path / "eval" / "case" / "case_summary.json").read_text())
    assert summary["reader"] == "openslide" and summary["mpp"] == 0.25 and summary["nuclei"] > 50
    import openslide

    handle = openslide.OpenSlide(str(tmp_path / "slides" / "case.svs"))  # the JPEG pixels, read by OpenSlide itself
    decoded = np.asarray(handle.read_region((0, 0), 0, handle.dimensions).convert("RGB"))
    agree_with_tile_inference(tmp_path, "case", decoded, tmp_path / "tiles")


def test_torchrun_with_a_rank_that_has_no_tile(tmp_path):
    """One 1-tile slide on 2 ranks: the idle rank still takes part in the merge, and the run ends."""
    write_slide(tmp_path / "slides" / "one.ome.tif", size=(768, 768), tissue=(256, 256, 512, 512), seed=4)
    _one_and_two_processes(tmp_path)
    name = "one/one_nuclei.geojson"
    assert (tmp_path / "two_out" / name).read_bytes() == (tmp_path / "one_out" / name).read_bytes()
