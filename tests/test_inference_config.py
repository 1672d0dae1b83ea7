"""The inference config's own pieces, in-process: preprocessing, nuclei on tile seams, one image failing.

Post-processing runs once on the whole stitched softmax, never per tile, so a nucleus that straddles a tile seam
must come out as one instance.  The stand-in network has a receptive field and zero padding, so a window edge
really does corrupt its output there, as a trained network's would; the margin of context around each tile's core
(the configured TiledInferer, here with 256-px tiles) is what hides that.  A naive per-tile run of the same network
is checked to split the seam nuclei, so the test can tell the difference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser
from skimage.draw import disk

from conftest import BUNDLE_ROOT
from scripts.data.pannuke.format import NUM_CLASSES

ROI = 256  # the tile size of these tests
# (row, col) centres: on the x = 256 seam, on the y = 256 seam, on a 4-tile corner, on the x = 192 start of the
# second column's window, and one away from every seam as a control
CENTRES = [(100, 256), (256, 330), (256, 256), (420, 192), (400, 90)]
RADIUS = 11


def bundle_parser() -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(BUNDLE_ROOT / "configs" / f) for f in ("train.json", "inference.json")])
    parser["bundle_root"] = str(BUNDLE_ROOT)
    parser["target"] = "boundary"  # the stand-in network below predicts the 7 boundary-target classes
    parser["tile_size"], parser["tile_margin"] = ROI, 32  # four tiles on the 512² test image
    return parser


@pytest.fixture(scope="module")
def parser() -> ConfigParser:
    return bundle_parser()


class DarknessNet(torch.nn.Module):
    """7-class logits from 5x5-mean darkness: dark = interior of type 1, mid = boundary, light = background."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dark = F.avg_pool2d(1.0 - x.mean(1, keepdim=True), 5, stride=1, padding=2)  # zeros past a window edge
        logits = torch.full((x.shape[0], NUM_CLASSES, *x.shape[2:]), -10.0)
        logits[:, 0:1] = 8 * (0.35 - dark)
        logits[:, 1:2] = 8 * (dark - 0.65)
        logits[:, 6:7] = 0.0
        return logits


def seam_image() -> tuple[torch.Tensor, np.ndarray]:
    """(1, 3, 512, 512) image in 0..1 with dark discs, and their ground-truth instance map."""
    gt = np.zeros((2 * ROI, 2 * ROI), dtype=np.int32)
    for i, centre in enumerate(CENTRES, start=1):
        gt[disk(centre, RADIUS, shape=gt.shape)] = i
    image = np.where(gt > 0, 0.2, 0.9).astype(np.float32)
    return torch.from_numpy(np.broadcast_to(image, (1, 3, *gt.shape)).copy()), gt


def best_iou(gt: np.ndarray, inst: np.ndarray, i: int) -> float:
    ids, counts = np.unique(inst[gt == i], return_counts=True)
    j = ids[np.argmax(counts)]
    return float(((gt == i) & (inst == j)).sum() / ((gt == i) | (inst == j)).sum()) if j else 0.0


def test_preprocessing_matches_training(parser):
    image = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    infer = parser.get_parsed_content("preprocessing")({"image": image.copy(), "name": "x"})
    empty = np.zeros((40, 50), dtype=np.uint16)
    train = parser.get_parsed_content("validate#preprocessing")({"image": image.copy(), "inst": empty, "type": empty})
    torch.testing.assert_close(torch.as_tensor(infer["image"]), torch.as_tensor(train["image"]), rtol=0, atol=0)
    np.testing.assert_array_equal(np.asarray(infer["rgb"]), image)  # the untouched copy the overlay is drawn on


def test_nucleus_on_a_tile_seam_is_one_instance(parser):
    inferer = parser.get_parsed_content("inferer")
    instances = parser.get_parsed_content("instances")
    image, gt = seam_image()
    with torch.no_grad():
        pred = inferer(image, DarknessNet())
    inst = instances({"pred": pred[0]})["inst_map"][0].numpy()
    assert inst.shape == gt.shape
    assert inst.max() == len(CENTRES), f"expected {len(CENTRES)} nuclei, found {inst.max()}"
    assert min(best_iou(gt, inst, i) for i in range(1, len(CENTRES) + 1)) > 0.8


def test_per_tile_post_processing_would_split_them(parser):
    """The same network and post-processing on non-overlapping tiles: the seam nuclei break, the control does not."""
    instances = parser.get_parsed_content("instances")
    image, gt = seam_image()
    inst = np.zeros_like(gt)
    for r in range(0, gt.shape[0], ROI):
        for c in range(0, gt.shape[1], ROI):
            with torch.no_grad():
                tile = DarknessNet()(image[..., r : r + ROI, c : c + ROI])[0]
            part = instances({"pred": tile})["inst_map"][0].numpy()
            inst[r : r + ROI, c : c + ROI] = np.where(part > 0, part + inst.max(), 0)
    pieces = [len(np.unique(inst[gt == i])) for i in range(1, len(CENTRES) + 1)]
    assert pieces[-1] == 1 and max(pieces[:-1]) > 1, pieces


def test_stitched_classes_match_a_whole_image_pass(parser):
    """Each tile's core, away from its window's corrupted edges, must give what one pass over the whole image gives."""
    inferer = parser.get_parsed_content("inferer")
    image, _ = seam_image()
    with torch.no_grad():
        stitched, whole = inferer(image, DarknessNet()), DarknessNet()(image)
    assert stitched.shape == whole.shape
    agree = (stitched.argmax(1) == whole.argmax(1)).float().mean().item()
    assert agree > 0.999, agree


def test_an_image_failing_inside_the_engine_does_not_stop_the_run(tmp_path, caplog):
    """A write that fails (here: a folder sits where the overlay goes) fails that image only; the summary says so."""
    from PIL import Image

    (tmp_path / "images").mkdir()
    for name in ("a", "b"):
        Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(tmp_path / "images" / f"{name}.png")
    (tmp_path / "out" / "a" / "a_overlay.png").mkdir(parents=True)
    with caplog.at_level("INFO"):
        outputs = segment_images(tmp_path / "images", tmp_path / "out", overwrite=True)
    assert [(o.name, o.status) for o in outputs.outcomes.values()] == [("a", "failed"), ("b", "done")]
    assert "a: FAILED" in caplog.text and "IsADirectoryError" in caplog.text and "1 failed" in caplog.text
    assert (tmp_path / "out" / "b" / "b_nuclei.geojson").is_file()
    assert (tmp_path / "out" / "inference_summary.csv").read_text().count("\n") == 3
    with pytest.raises(SystemExit, match="1 of 2 images failed"):
        outputs.raise_if_failed()


def segment_images(folder, out, **settings):
    """Image inference in-process with the darkness network; the run's outputs."""
    parser = bundle_parser()
    base = {"input_dir": str(folder), "output_dir": str(out), "num_workers": 0, "device": "cpu", "amp": False}
    for key, value in {**base, "network": DarknessNet(), **settings}.items():
        parser[key] = value
    parser["handlers"] = [h for h in parser["handlers"] if "WeightsLoader" not in str(h)]
    parser.get_parsed_content("evaluator").run()
    parser.get_parsed_content("writer").complete()
    return parser.get_parsed_content("outputs")


def test_images_with_complete_outputs_are_skipped_before_they_are_read(tmp_path, caplog):
    """The outputs plan the run: a finished image is skipped without reading its file (here since damaged); with
    --overwrite it is read, fails in one line, and the other image is redone."""
    from PIL import Image

    image, _ = seam_image()
    (tmp_path / "images").mkdir()
    for name in ("a", "b"):
        Image.fromarray((image[0, :, :64, :64].permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(
            tmp_path / "images" / f"{name}.png"
        )
    first = segment_images(tmp_path / "images", tmp_path / "out")
    assert [o.status for o in first.outcomes.values()] == ["done", "done"]
    (tmp_path / "images" / "a.png").write_bytes(b"not a png any more")
    again = segment_images(tmp_path / "images", tmp_path / "out")
    assert [(o.name, o.status) for o in again.outcomes.values()] == [("a", "skipped"), ("b", "skipped")]
    with caplog.at_level("INFO"):
        redone = segment_images(tmp_path / "images", tmp_path / "out", overwrite=True)
    assert [(o.name, o.status) for o in redone.outcomes.values()] == [("a", "failed"), ("b", "done")]
    assert "a: FAILED" in caplog.text and "a.png" in caplog.text
    assert (tmp_path / "out" / "a" / "a_nuclei.csv").is_file()  # a failed image keeps what an earlier run wrote


def test_an_error_of_the_network_stops_the_run_instead_of_ending_it_as_done(tmp_path):
    """ignite hands an exception to EXCEPTION_RAISED handlers rather than raising it; the progress bar is one, and
    returning from it ended the run as if it had completed (exit status 0, the later images never segmented)."""
    from PIL import Image

    class FailsOnSecond(DarknessNet):
        calls = 0

        def forward(self, x):
            FailsOnSecond.calls += 1
            if FailsOnSecond.calls == 2:
                raise RuntimeError("CUDA out of memory (stand-in)")
            return super().forward(x)

    (tmp_path / "images").mkdir()
    for name in ("a", "b", "c"):
        Image.fromarray(np.full((48, 48, 3), 200, np.uint8)).save(tmp_path / "images" / f"{name}.png")
    with pytest.raises(RuntimeError, match="out of memory"):
        segment_images(tmp_path / "images", tmp_path / "out", network=FailsOnSecond(), backend="torch")
    assert (tmp_path / "out" / "a" / "a_nuclei.csv").is_file() and not (tmp_path / "out" / "c").exists()


def test_an_image_that_never_reached_the_writer_counts_as_failed(tmp_path):
    from scripts.workflows.predict.image_outputs import ImageOutputs
    from scripts.workflows.predict.inputs import InputImage

    outputs = ImageOutputs(str(tmp_path))
    assert [i.name for i in outputs.plan([InputImage("a", tmp_path / "a.png")])] == ["a"]
    outputs.finish_run()
    assert outputs.outcomes["a"].status == "failed" and "never reached the writer" in outputs.outcomes["a"].detail
    with pytest.raises(SystemExit, match="1 of 1 images failed"):
        outputs.raise_if_failed()


@pytest.mark.slow
def test_images_post_processed_in_worker_processes_give_the_same_files(tmp_path):
    """The one writer runs an image's post-processing in a pool as it does a slide tile's: same files, same order."""
    from PIL import Image

    image, _ = seam_image()
    rgb = (image[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    (tmp_path / "images").mkdir()
    for i, shift in enumerate((0, 40, 80)):  # three images, so results come back from the pool in a queue
        Image.fromarray(np.roll(rgb, shift, axis=1)).save(tmp_path / "images" / f"field{i}.png")
    inline = segment_images(tmp_path / "images", tmp_path / "inline", postprocess_workers=0)
    pooled = segment_images(tmp_path / "images", tmp_path / "pooled", postprocess_workers=1)
    assert [(o.name, o.status, o.nuclei) for o in pooled.outcomes.values()] == [
        (o.name, o.status, o.nuclei) for o in inline.outcomes.values()
    ]
    assert [o.nuclei for o in inline.outcomes.values()] == [len(CENTRES)] * 3
    files = sorted(p.relative_to(tmp_path / "inline") for p in (tmp_path / "inline").glob("*/*"))
    assert len(files) == 3 * 5
    for name in files:
        assert (tmp_path / "inline" / name).read_bytes() == (tmp_path / "pooled" / name).read_bytes(), name


@pytest.mark.parametrize("tiles_per_batch", [1, 4])
def test_the_slide_progress_bar_counts_tiles(tiles_per_batch):
    parser = ConfigParser()
    configs = ("train.json", "inference.json", "inference_wsi.json")
    parser.read_config([str(BUNDLE_ROOT / "configs" / f) for f in configs])
    parser["bundle_root"], parser["tiles_per_batch"] = str(BUNDLE_ROOT), tiles_per_batch
    bar = parser.get_parsed_content("progress")
    assert bar.tqdm_kwargs["unit"] == "tile" and "{rate_fmt}" in bar.bar_format
    assert bar.tqdm_kwargs["unit_scale"] == (tiles_per_batch if tiles_per_batch > 1 else False)  # 1: no SI prefixes
    assert "@progress" in parser["handlers"]
