"""Whole slides on small generated pyramids: scale, tissue, seams, resume, bad slides."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from slide_fixtures import GLASS, write_slide

from scripts.core.classes import PANNUKE
from scripts.core.errors import DataError
from scripts.workflows.slides.plan import SlidePlanner, tile_grid
from scripts.workflows.slides.progress import SlideProgress
from scripts.workflows.slides.reader import open_slide
from scripts.workflows.slides.tissue import tissue_mask
from scripts.core.qupath import simplify_rings
from scripts.workflows.predict.nucleus_record import nucleus_table


def test_a_40x_slide_is_read_at_level_0_and_a_20x_slide_is_upsampled(tmp_path):
    image = write_slide(tmp_path / "s40.ome.tif", mpp=0.25)
    slide = open_slide(tmp_path / "s40.ome.tif")
    assert slide.mpp == pytest.approx(0.25) and slide.level_for_model() == 0 and slide.model_size == (1536, 1536)
    region = slide.read(300, 300, 64, 64)
    assert np.abs(region.astype(int) - image[300:364, 300:364]).mean() < 8  # JPEG, otherwise the same pixels
    write_slide(tmp_path / "s20.ome.tif", mpp=0.5)
    slide20 = open_slide(tmp_path / "s20.ome.tif")
    assert slide20.scale == pytest.approx(0.5) and slide20.model_size == (3072, 3072)  # twice the model pixels
    assert slide20.read(600, 600, 128, 128).shape == (128, 128, 3)  # 64 slide pixels, upsampled to the model


@pytest.mark.parametrize("mpp", [0.5, 0.2])  # a 20x slide upsampled, a 50x one shrunk
def test_tiles_are_the_slide_resampled_once_onto_the_model_grid(tmp_path, mpp):
    """Each tile is resampled on its own, yet none is shifted or stretched: a tile gives the pixels of one read of
    the whole slide, which inside is PIL's resize of the whole level; at the slide's edge it blends into white,
    not the black tiffslide pads with."""
    write_slide(tmp_path / "s.ome.tif", size=(768, 768), tissue=(0, 0, 768, 768), mpp=mpp)
    slide = open_slide(tmp_path / "s.ome.tif")
    level0 = np.asarray(slide.handle.read_region((0, 0), 0, (768, 768)))[..., :3]
    mw, mh = slide.model_size
    whole = slide.read(0, 0, mw, mh).astype(int)
    assert whole.shape == (mh, mw, 3) and mw == int(768 * mpp / 0.25)
    direct = np.asarray(
        Image.fromarray(level0).resize(
            (mw, mh), Image.Resampling.BILINEAR, box=(0, 0, mw * slide.scale, mh * slide.scale)
        )
    )
    assert np.abs(whole[8:-8, 8:-8] - direct[8:-8, 8:-8]).max() <= 1
    for x, y in [(0, 0), (300, 200), (mw - 256, 37), (mw - 256, mh - 256)]:
        assert np.abs(slide.read(x, y, 256, 256).astype(int) - whole[y : y + 256, x : x + 256]).max() <= 1, (x, y)
    assert whole[0].mean() > whole[2].mean() - 10 and whole[:, -1].mean() > whole[:, -3].mean() - 10


def test_an_80x_slide_reads_the_level_nearest_the_model_scale(tmp_path):
    write_slide(tmp_path / "s80.ome.tif", mpp=0.125, levels=3)
    slide = open_slide(tmp_path / "s80.ome.tif")
    assert slide.backend == "tiffslide"  # the reader that sees the OME pyramid's sub-resolutions
    assert slide.level_for_model() == 1  # downsample 2 = 0.25 µm/px; level 2 (0.5) would be too coarse


def test_missing_mpp_is_an_error_unless_given(tmp_path):
    write_slide(tmp_path / "plain.tif", mpp=None)
    with pytest.raises(DataError, match=r"plain\.tif: the slide does not say its µm per pixel; pass --mpp"):
        open_slide(tmp_path / "plain.tif")
    assert open_slide(tmp_path / "plain.tif", mpp=0.5).scale == pytest.approx(0.5)


def test_tissue_mask_finds_the_stained_block_and_the_grid_skips_glass(tmp_path):
    write_slide(tmp_path / "s.ome.tif", tissue=(256, 256, 768, 768))
    slide = open_slide(tmp_path / "s.ome.tif")
    thumb, factor = slide.thumbnail(384)
    mask = tissue_mask(thumb)
    assert mask[int(400 / factor), int(400 / factor)] and not mask[int(1200 / factor), int(1200 / factor)]
    tiles = tile_grid(mask, factor, slide.model_size, 512, 32)
    assert [t.core[:2] for t in tiles] == [(0, 0), (512, 0), (0, 512), (512, 512)]  # none of the glass-only tiles
    assert tissue_mask(np.full((64, 64, 3), GLASS, np.uint8)).sum() == 0


def test_a_nucleus_on_a_tile_corner_comes_out_once():
    """Four tiles share a corner at (100, 100); a nucleus sits on it. Each tile sees it whole (margin 20)."""
    inst_types, probs = np.array([0, 2]), np.array([0.0, 0.9])
    kept = []
    for cx, cy in [(0, 0), (100, 0), (0, 100), (100, 100)]:
        window = (cx - 20, cy - 20, 140, 140)
        inst = np.zeros((140, 140), np.int32)
        y, x = 100 - window[1], 100 - window[0]  # the nucleus, centred just inside the lower-right tile
        inst[y - 5 : y + 7, x - 5 : x + 7] = 1
        table = nucleus_table(inst, inst_types, probs, PANNUKE, origin=window[:2], core=(cx, cy, 100, 100))
        kept += [(x, area) for x, area in zip(table["x_px"], table["area_px"], strict=True)]
    assert len(kept) == 1 and kept[0][0] == pytest.approx(101.0) and kept[0][1] == 144


def test_polygons_are_simplified_within_a_pixel():
    ring = [[x, 0] for x in range(0, 11)] + [[10, y] for y in range(1, 11)] + [[0, 10], [0, 0]]
    small = [[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]]
    simple, same = simplify_rings([ring, small], 1.0)
    assert same == small and simplify_rings([ring], 0) == [ring]
    assert len(simple) < len(ring) and simple[0] == simple[-1]
    assert {tuple(p) for p in simple} >= {(0, 0), (10, 0), (10, 10), (0, 10)}


def test_a_resumed_slide_writes_what_an_uninterrupted_one_does(tmp_path):
    def run(folder, stop_after=None, garbage=False):
        progress = SlideProgress(folder, "s")
        progress.resume()
        for tile in range(6):
            if tile in progress.done:
                continue
            if stop_after is not None and tile == stop_after:
                if garbage:  # a kill in the middle of a write leaves half a feature behind
                    with open(progress.partial["geojson"], "a") as f:
                        f.write(',\n{"type":"Feat')
                progress.close()
                return
            features = [f'{{"id":{tile}{k}}}' for k in range(tile % 3)]
            rows = [f"{tile}{k},1,1,1,1,1,Neoplastic,1,0.5\n" for k in range(tile % 3)]
            progress.add_tile(tile, features, rows, [1] * len(features))
        progress.finish({"nuclei": progress.nuclei})

    run(tmp_path / "whole")
    run(tmp_path / "resumed", stop_after=4, garbage=True)
    assert not (tmp_path / "resumed" / "s_summary.json").exists()
    run(tmp_path / "resumed")
    for name in ("s_nuclei.geojson", "s_nuclei.csv", "s_summary.json"):
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert not list((tmp_path / "resumed").glob(".*"))  # no partial or progress file left

    for damage in (b"\xff\xfe\x00garbage", b'{"tile": "three"}', b"[1, 2]"):  # a journal someone damaged
        folder = tmp_path / f"damaged{len(damage)}"
        run(folder, stop_after=4)
        journal = folder / ".progress.jsonl"
        lines = journal.read_bytes().splitlines()
        journal.write_bytes(b"\n".join([*lines[:2], damage, *lines[3:]]) + b"\n")
        run(folder)  # tiles from the damaged line on are redone, nothing is blamed on the slide
        for name in ("s_nuclei.geojson", "s_nuclei.csv", "s_summary.json"):
            assert (folder / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), (damage, name)


def test_a_corrupt_slide_is_reported_and_the_next_one_still_planned(tmp_path, caplog):
    (tmp_path / "slides").mkdir()
    (tmp_path / "slides" / "a_broken.svs").write_bytes(b"II*\x00" + b"\x00" * 500)
    write_slide(tmp_path / "slides" / "b_good.ome.tif")
    planner = SlidePlanner(tmp_path / "slides", tmp_path / "out", tile_size=512)
    broken, good = planner.plans
    assert "a_broken.svs: not a slide this bundle can read" in broken.error and "a_broken.svs" in caplog.text
    assert not good.error and good.todo and (tmp_path / "out" / "b_good" / "b_good_tissue.png").is_file()


def test_a_link_where_a_slides_folder_goes_fails_that_slide_only(tmp_path):
    write_slide(tmp_path / "slides" / "a.ome.tif")
    write_slide(tmp_path / "slides" / "b.ome.tif")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a").symlink_to(tmp_path / "elsewhere")
    linked, good = SlidePlanner(tmp_path / "slides", tmp_path / "out", tile_size=512).plans
    assert "a is a symbolic link out of --output_dir" in linked.error
    assert not any((tmp_path / "elsewhere").iterdir())
    assert not good.error and (tmp_path / "out" / "b" / "b_tissue.png").is_file()


@pytest.mark.parametrize("own_file", [".a_nuclei.csv.partial", ".progress.jsonl", ".grid.json", "a_summary.json"])
def test_a_link_planted_among_a_slides_own_files_fails_that_slide_only(tmp_path, own_file):
    """Appending to a partial file, cutting it back or reading the journal used to follow a link out of the folder."""
    write_slide(tmp_path / "slides" / "a.ome.tif")
    write_slide(tmp_path / "slides" / "b.ome.tif")
    outside = tmp_path / "outside.txt"
    outside.write_text("someone else's file")
    (tmp_path / "out" / "a").mkdir(parents=True)
    (tmp_path / "out" / "a" / own_file).symlink_to(outside)
    linked, good = SlidePlanner(tmp_path / "slides", tmp_path / "out", tile_size=512).plans
    assert f"{own_file} is a symbolic link out of --output_dir" in linked.error and not linked.tiles
    assert outside.read_text() == "someone else's file"
    assert not good.error and good.tiles


def test_a_tissue_mask_of_another_aspect_ratio_is_refused_not_stretched(tmp_path):
    from PIL import Image

    write_slide(tmp_path / "slides" / "s.ome.tif")  # square
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.full((20, 30), 255, np.uint8)).save(tmp_path / "masks" / "s.png")
    (plan,) = SlidePlanner(tmp_path / "slides", tmp_path / "out", tile_size=512, mask_dir=tmp_path / "masks").plans
    assert "s.png: a tissue mask of 30 x 20 px for a slide of aspect" in plan.error and not plan.tiles


def test_a_users_tissue_mask_replaces_the_automatic_one(tmp_path):
    from PIL import Image

    write_slide(tmp_path / "slides" / "s.ome.tif", tissue=(256, 256, 768, 768))
    (tmp_path / "masks").mkdir()
    user = np.zeros((30, 30), np.uint8)
    user[25:, 25:] = 255  # only the lower-right corner, which is glass
    Image.fromarray(user).save(tmp_path / "masks" / "s.png")
    planner = SlidePlanner(tmp_path / "slides", tmp_path / "out", tile_size=512, mask_dir=tmp_path / "masks")
    assert [t.core[:2] for t in planner.plans[0].tiles] == [(1024, 1024)]


def test_a_mask_folder_that_is_not_there_or_lacks_a_slides_mask_is_said(tmp_path, caplog):
    from scripts.core.errors import ConfigError

    write_slide(tmp_path / "slides" / "s.ome.tif")
    with pytest.raises(ConfigError, match="--tissue_mask_dir .*/masks is not a folder"):
        SlidePlanner(tmp_path / "slides", tmp_path / "out", tile_size=512, mask_dir=tmp_path / "masks")
    assert not (tmp_path / "out").exists()
    (tmp_path / "masks").mkdir()
    (plan,) = SlidePlanner(tmp_path / "slides", tmp_path / "out", tile_size=512, mask_dir=tmp_path / "masks").plans
    assert plan.tiles and "s: no tissue mask" in caplog.text and "finding tissue on the thumbnail" in caplog.text


@pytest.mark.parametrize("margin", [-1, 513])
def test_a_margin_outside_zero_to_the_tile_size_is_refused(tmp_path, margin):
    from scripts.core.errors import ConfigError

    write_slide(tmp_path / "slides" / "s.ome.tif")
    with pytest.raises(ConfigError, match=f"--tile_margin must be from 0 to --tile_size \\(512\\).*got {margin}"):
        SlidePlanner(tmp_path / "slides", tmp_path / "out", tile_size=512, margin=margin)


def test_progress_made_on_another_grid_is_not_reused(tmp_path):
    write_slide(tmp_path / "slides" / "s.ome.tif", tissue=(256, 256, 768, 768))
    first = SlidePlanner(tmp_path / "slides", tmp_path / "out", tile_size=512)
    progress = SlideProgress(first.plans[0].folder, "s")
    progress.add_tile(0, ['{"id":1}'], ["1,1,1,1,1,1,Neoplastic,1,0.5\n"], [1])
    progress.close()
    assert SlidePlanner(tmp_path / "slides", tmp_path / "out", tile_size=512).plans[0].todo[0].index == 1  # resumed
    other = SlidePlanner(tmp_path / "slides", tmp_path / "out", tile_size=256).plans[0]
    assert len(other.todo) == len(other.tiles)  # another tile size: tile 0 is another tile, so all are redone


def test_implausible_scales_and_name_clashes_are_refused(tmp_path):
    write_slide(tmp_path / "slides" / "a.ome.tif")
    with pytest.raises(DataError, match="--mpp 400 is not a microscope scale"):
        open_slide(tmp_path / "slides" / "a.ome.tif", mpp=400)
    write_slide(tmp_path / "twins" / "b.tif", mpp=0.25)
    write_slide(tmp_path / "twins" / "b.tiff", mpp=0.25)
    plans = SlidePlanner(tmp_path / "twins", tmp_path / "out", tile_size=512).plans
    assert not plans[0].error and "same name as" in plans[1].error


def test_windows_stay_inside_the_slide_and_have_one_size_so_edge_tiles_batch():
    tiles = tile_grid(np.ones((10, 10), bool), 100.0, (1000, 1000), 384, 32)
    assert {t.window[2:] for t in tiles} == {(448, 448)}
    assert {t.core[2] for t in tiles} == {384, 232}  # the last column's core is clipped, not its window
    for t in tiles:
        (x, y, w, h), (cx, cy, cw, ch) = t.window, t.core
        assert 0 <= x <= cx and cx + cw <= x + w <= 1000 and 0 <= y <= cy and cy + ch <= y + h <= 1000
    assert {t.window[:2] for t in tiles} == {(a, b) for a in (0, 352, 552) for b in (0, 352, 552)}  # edges shifted in
    narrow = tile_grid(np.ones((10, 10), bool), 100.0, (1000, 300), 384, 32)
    assert {(t.window[1], t.window[3]) for t in narrow} == {(0, 300)}  # narrower than a window: the whole height


def test_cores_whose_windows_coincide_are_one_tile_as_in_tile_inference():
    """400 px is narrower than a 448-px window: the cores 0-384 and 384-400 would run the same window twice."""
    from scripts.model.tiled import tile_spans

    tiles = tile_grid(np.ones((10, 10), bool), 100.0, (1000, 400), 384, 32)
    assert [t.core[1::2] for t in tiles] == [(0, 400)] * 3  # one row of tiles, each core the whole height
    assert len({t.window for t in tiles}) == len(tiles)  # no window twice
    columns = [(x, w, wx, ww) for x, w, wx, ww in tile_spans(1000, 384, 32)]
    assert [(t.core[0], t.core[2], t.window[0], t.window[2]) for t in tiles] == columns


def test_a_batch_never_mixes_window_sizes():
    from types import SimpleNamespace

    from scripts.model.tiled import Tile
    from scripts.workflows.slides.tiles import WindowBatches

    sizes = [(448, 448)] * 3 + [(448, 300)] * 2 + [(448, 448)]
    data = [(0, Tile(i, (0, 0, 1, 1), (0, 0, *size))) for i, size in enumerate(sizes)]
    batches = WindowBatches(SimpleNamespace(data=data), batch_size=2)
    assert list(batches) == [[0, 1], [2], [3, 4], [5]] and len(batches) == 4
