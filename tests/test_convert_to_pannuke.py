"""convert_to_pannuke: a lab's images + masks become one PanNuke fold the bundle can train on, or a clear error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from scripts.data.pannuke.convert import main, tile_origins
from scripts.data.pannuke.format import NUM_TYPES, TILE_SIZE

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
CONSEP_TEST = Path("/work/shared/data/consep/test")
CONSEP_MAP = "1:Dead,2:Inflammatory,3:Neoplastic,4:Connective"


def _labels(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Instance map with non-contiguous ids (one nucleus straddling column 250) and a matching type map."""
    inst = np.zeros(shape, dtype=np.uint16)
    types = np.zeros(shape, dtype=np.uint8)
    boxes = [(10, 10, 1), (100, 246, 2), (270, 480, 3), (150, 60, 1), (40, 300, 2)]  # row, col, source type
    for k, (r, c, t) in enumerate(boxes):
        if r + 8 <= shape[0] and c + 8 <= shape[1]:
            inst[r : r + 8, c : c + 8] = 10 * (k + 1)
            types[r : r + 8, c : c + 8] = t
    return inst, types


def _write_set(root: Path, stem: str, shape: tuple[int, int], mask_format: str = "npz", seed: int = 0) -> np.ndarray:
    """Write image (PNG) + mask in the requested format under root/images and root/masks; return the image."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    image = np.random.default_rng(seed).integers(0, 230, size=(*shape, 3), dtype=np.uint8)
    Image.fromarray(image).save(root / "images" / f"{stem}.png")
    inst, types = _labels(shape)
    if mask_format == "npz":
        np.savez(root / "masks" / f"{stem}.npz", inst_map=inst, type_map=types)
    elif mask_format == "tif":
        tifffile.imwrite(root / "masks" / f"{stem}.tif", inst)
    elif mask_format == "png":
        Image.fromarray(inst).save(root / "masks" / f"{stem}.png")
    return image


def _run(root: Path, *extra: str, fold: int = 1) -> int:
    args = [
        "--images",
        str(root / "images"),
        "--masks",
        str(root / "masks"),
        "--output_dir",
        str(root / "out"),
        "--fold",
        str(fold),
        *extra,
    ]
    return main(args)


def _load(root: Path, fold: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    base = root / "out" / f"Fold {fold}"
    return (
        np.load(base / "images" / f"fold{fold}" / "images.npy"),
        np.load(base / "masks" / f"fold{fold}" / "masks.npy"),
        np.load(base / "images" / f"fold{fold}" / "types.npy"),
    )


def _check_pannuke_masks(masks: np.ndarray) -> None:
    """Every pixel in at most one type channel; channel 5 is exactly 'no nucleus'."""
    in_channels = (masks[..., :NUM_TYPES] > 0).sum(axis=-1)
    assert in_channels.max() <= 1
    assert np.array_equal(masks[..., NUM_TYPES], (in_channels == 0).astype(np.float64))


def test_tile_origins_shift_the_last_tile_back() -> None:
    assert tile_origins(300) == [0, 44]
    assert tile_origins(500) == [0, 244]
    assert tile_origins(256) == [0]
    assert tile_origins(200) == [0]
    assert tile_origins(500, stride=128) == [0, 128, 244]
    assert tile_origins(512) == [0, 256]


def test_300x500_image_cut_into_four_tiles(tmp_path: Path) -> None:
    image = _write_set(tmp_path, "a", (300, 500))
    inst, _ = _labels((300, 500))
    assert _run(tmp_path, "--class_map", "1:Neoplastic,2:Inflammatory,3:Dead", "--tissue", "Colon") == 0
    images, masks, types = _load(tmp_path)
    assert images.shape == (4, TILE_SIZE, TILE_SIZE, 3) and masks.shape == (4, TILE_SIZE, TILE_SIZE, 6)
    origins = [(0, 0), (0, 244), (44, 0), (44, 244)]
    for i, (y, x) in enumerate(origins):
        window = (slice(y, y + TILE_SIZE), slice(x, x + TILE_SIZE))
        assert np.array_equal(images[i], image[window].astype(np.float64))
        assert np.array_equal(masks[i, ..., :NUM_TYPES].sum(axis=-1), inst[window].astype(np.float64))
    _check_pannuke_masks(masks)
    # the nucleus at columns 246-253 lies in both column bands, whole; id 20 is Inflammatory (channel 1)
    assert (masks[0, ..., 1] == 20).sum() == 64 and (masks[1, ..., 1] == 20).sum() == 64
    assert set(np.unique(masks[3])) >= {30.0}  # bottom-right nucleus (source type 3 -> Dead) in the last tile
    assert (masks[3, ..., 3] == 30).sum() == 64
    assert list(types) == ["Colon"] * 4


def test_tile_edge_keeps_the_part_of_a_cut_nucleus(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.full((300, 600, 3), 90, np.uint8)).save(tmp_path / "images" / "c.png")
    inst = np.zeros((300, 600), np.uint16)
    inst[20:30, 250:262] = 7  # crosses column 256, the first tile's right edge
    tifffile.imwrite(tmp_path / "masks" / "c.tif", inst)
    assert _run(tmp_path, "--default_type", "Epithelial") == 0
    _, masks, _ = _load(tmp_path)
    assert masks.shape[0] == 6  # columns [0, 256, 344] x rows [0, 44]
    assert (masks[0, ..., 4] == 7).sum() == 10 * 6  # columns 250-255 of it
    assert (masks[1, ..., 4] == 7).sum() == 10 * 6  # columns 256-261 of it


def test_small_image_is_padded_white(tmp_path: Path) -> None:
    image = _write_set(tmp_path, "s", (200, 150), mask_format="png")
    assert _run(tmp_path, "--default_type", "Connective") == 0
    images, masks, _ = _load(tmp_path)
    assert images.shape[0] == 1
    assert np.array_equal(images[0, :200, :150], image.astype(np.float64))
    assert (images[0, 200:] == 255).all() and (images[0, :, 150:] == 255).all()
    assert (masks[0, 200:, :, :NUM_TYPES] == 0).all() and (masks[0, 200:, :, NUM_TYPES] == 1).all()
    assert set(np.unique(masks[0, ..., 2])) == {0.0, 10.0, 40.0}  # untyped nuclei all in Connective


def test_type_mapping_majority_unmapped_and_drop(tmp_path: Path, capsys) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.full((256, 256, 3), 200, np.uint8)).save(tmp_path / "images" / "t.png")
    inst = np.zeros((256, 256), np.uint16)
    types = np.zeros((256, 256), np.uint8)
    inst[10:20, 10:20], types[10:20, 10:20] = 1, 1
    types[10:13, 10:20] = 2  # 30 px type 2, 70 px type 1: majority 1
    inst[50:60, 50:60], types[50:60, 50:60] = 2, 2
    inst[100:110, 100:110], types[100:110, 100:110] = 3, 9  # not in the map
    inst[150:160, 150:160] = 4
    types[150:152, 150:160] = 2  # partly typed: unlabelled pixels do not outvote the typed ones
    inst[200:210, 200:210] = 5  # no type pixels at all: source type 0
    np.savez(tmp_path / "masks" / "t.npz", inst_map=inst, type_map=types)
    assert _run(tmp_path, "--class_map", "1:Inflammatory,2:Neoplastic") == 0
    _, masks, _ = _load(tmp_path)
    assert set(np.unique(masks[0, ..., 1])) == {0, 1} and set(np.unique(masks[0, ..., 0])) == {0, 2, 4}
    assert not np.isin(masks[0, ..., :NUM_TYPES], [3, 5]).any()
    assert (masks[0, 100:110, 100:110, NUM_TYPES] == 1).all()  # dropped nucleus is background
    out = capsys.readouterr().out
    assert "dropped" in out and "source type 0: 1" in out and "source type 9: 1" in out
    assert "Neoplastic 2, Inflammatory 1," in out
    assert _run(tmp_path, "--class_map", "1:inflammatory,2:Neoplastic", "--unmapped", "Dead", "--overwrite") == 0
    _, masks, _ = _load(tmp_path)
    assert set(np.unique(masks[0, ..., 3])) == {0, 3, 5}
    _check_pannuke_masks(masks)


def test_written_fold_has_exact_pannuke_layout_and_dtypes(tmp_path: Path) -> None:
    _write_set(tmp_path, "a", (256, 256), mask_format="tif")
    assert _run(tmp_path, "--default_type", "Neoplastic", "--tissue", "Breast", fold=3) == 0
    fold = tmp_path / "out" / "Fold 3"
    files = sorted(str(p.relative_to(fold)) for p in fold.rglob("*") if p.is_file())
    assert files == ["images/fold3/images.npy", "images/fold3/types.npy", "masks/fold3/masks.npy"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["Fold 3"]  # no temp folders left
    images, masks, types = _load(tmp_path, fold=3)
    assert images.dtype == np.float64 and images.shape == (1, 256, 256, 3)
    assert 0 <= images.min() and images.max() <= 255
    assert masks.dtype == np.float64 and masks.shape == (1, 256, 256, 6)
    assert types.dtype.kind == "U" and types.shape == (1,) and types[0] == "Breast"
    np.load(fold / "images" / "fold3" / "types.npy", allow_pickle=False)


def test_append_adds_tiles_after_the_existing_ones(tmp_path: Path) -> None:
    _write_set(tmp_path, "a", (256, 256))
    assert _run(tmp_path, "--tissue", "Colon", "--class_map", CONSEP_MAP) == 0
    first_images, first_masks, _ = _load(tmp_path)
    second = tmp_path / "second"
    _write_set(second, "b", (300, 500), seed=1)
    args = [
        "--images",
        str(second / "images"),
        "--masks",
        str(second / "masks"),
        "--output_dir",
        str(tmp_path / "out"),
        "--fold",
        "1",
        "--tissue",
        "Stomach",
        "--class_map",
        CONSEP_MAP,
        "--append",
    ]
    assert main(args) == 0
    images, masks, types = _load(tmp_path)
    assert images.shape[0] == 5 and masks.shape[0] == 5
    assert np.array_equal(images[:1], first_images) and np.array_equal(masks[:1], first_masks)
    assert list(types) == ["Colon"] + ["Stomach"] * 4 and types.dtype.kind == "U"


def test_refuses_to_overwrite_an_existing_fold(tmp_path: Path, capsys) -> None:
    _write_set(tmp_path, "a", (256, 256))
    assert _run(tmp_path, "--class_map", CONSEP_MAP) == 0
    before = _load(tmp_path)[1].copy()
    (tmp_path / "masks" / "a.npz").unlink()
    np.savez(tmp_path / "masks" / "a.npz", inst_map=np.zeros((256, 256), np.uint16))
    assert _run(tmp_path, "--default_type", "Dead") == 2
    err = capsys.readouterr().err
    assert "Fold 1" in err and "--append" in err and "--overwrite" in err
    assert np.array_equal(_load(tmp_path)[1], before)
    assert _run(tmp_path, "--default_type", "Dead", "--overwrite") == 0
    assert not _load(tmp_path)[1][..., :NUM_TYPES].any()


def test_bad_pairs_are_all_named_and_nothing_is_written(tmp_path: Path, capsys) -> None:
    _write_set(tmp_path, "good", (256, 256))
    _write_set(tmp_path, "nomask", (256, 256))
    (tmp_path / "masks" / "nomask.npz").unlink()
    _write_set(tmp_path, "wrongsize", (256, 300))
    inst, types = _labels((256, 256))
    np.savez(tmp_path / "masks" / "wrongsize.npz", inst_map=inst, type_map=types)
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png")
    np.savez(tmp_path / "masks" / "broken.npz", inst_map=inst)
    assert _run(tmp_path, "--class_map", CONSEP_MAP) == 2
    err = capsys.readouterr().err
    assert "nomask.png" in err and "no mask" in err
    assert "wrongsize.png is 256x300" in err and "wrongsize.npz is 256x256" in err
    assert "broken.png" in err and "not a readable image" in err
    assert "--skip_bad" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    with pytest.warns(UserWarning, match=r"skipped 3 bad input") as record:
        assert _run(tmp_path, "--class_map", CONSEP_MAP, "--skip_bad") == 0
    message = str(record[0].message)
    assert "nomask.png" in message and "wrongsize.png" in message and "broken.png" in message
    assert _load(tmp_path)[0].shape[0] == 1


def test_unusable_images_and_missing_types_get_clear_errors(tmp_path: Path, capsys) -> None:
    _write_set(tmp_path, "g", (256, 256), mask_format="tif")
    Image.fromarray(np.full((256, 256), 128, np.uint8)).save(tmp_path / "images" / "g.png")  # grayscale
    assert _run(tmp_path, "--default_type", "Dead") == 2
    assert "grayscale" in capsys.readouterr().err
    (tmp_path / "images" / "g.png").unlink()
    rgba = np.zeros((256, 256, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:, 128:, 3] = 255  # left half transparent
    Image.fromarray(rgba).save(tmp_path / "images" / "g.png")
    assert _run(tmp_path) == 2
    assert "--default_type" in capsys.readouterr().err  # untyped mask, no default type
    assert _run(tmp_path, "--default_type", "Dead") == 0
    images = _load(tmp_path)[0]
    assert (images[0, :, :128] == 255).all()  # transparent -> white
    assert (images[0, :, 128:] == [255, 0, 0]).all()


def test_16bit_images_are_read_as_inference_reads_them(tmp_path: Path) -> None:
    """One reader for the converter and inference: a 16-bit TIFF is scaled to 8 bits, not refused."""
    from scripts.data.images import read_rgb

    image = _write_set(tmp_path, "g", (256, 256), mask_format="tif")
    (tmp_path / "images" / "g.png").unlink()
    tifffile.imwrite(tmp_path / "images" / "g.tif", image.astype(np.uint16) * 257)
    assert _run(tmp_path, "--default_type", "Dead") == 0
    converted = _load(tmp_path)[0][0]
    np.testing.assert_array_equal(converted, image.astype(np.float64))
    np.testing.assert_array_equal(converted, read_rgb(tmp_path / "images" / "g.tif"))


def test_skip_empty_and_stride(tmp_path: Path) -> None:
    _write_set(tmp_path, "a", (300, 500))
    assert _run(tmp_path, "--class_map", CONSEP_MAP, "--stride", "128") == 0
    assert _load(tmp_path)[0].shape[0] == 6  # rows [0, 44] x columns [0, 128, 244]
    (tmp_path / "masks" / "a.npz").unlink()
    inst = np.zeros((300, 500), np.uint16)
    inst[5:10, 5:10] = 1  # only in tiles starting at row 0, column 0
    np.savez(tmp_path / "masks" / "a.npz", inst_map=inst)
    assert _run(tmp_path, "--default_type", "Dead", "--skip_empty", "--overwrite") == 0
    assert _load(tmp_path)[0].shape[0] == 1


def test_bad_arguments_fail_before_reading(tmp_path: Path, capsys) -> None:
    _write_set(tmp_path, "a", (256, 256))
    assert _run(tmp_path, "--class_map", "1:Tumour") == 2
    assert "Neoplastic" in capsys.readouterr().err
    assert _run(tmp_path, "--default_type", "Dead", "--stride", "300") == 2
    assert "--stride" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["file", "module"])
def test_help(how: str) -> None:
    cmd = ["scripts/data/pannuke/convert.py"] if how == "file" else ["-m", "scripts.data.pannuke.convert"]
    out = subprocess.run([sys.executable, *cmd, "--help"], cwd=BUNDLE, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for option in ("--images", "--masks", "--class_map", "--append", "--overwrite", "--skip_bad", "--stride"):
        assert option in out.stdout


def test_real_consep_tiles(tmp_path: Path) -> None:
    if not CONSEP_TEST.is_dir():
        pytest.skip(f"{CONSEP_TEST} not on this machine")
    stems = sorted(p.stem for p in (CONSEP_TEST / "images").glob("*.jpg"))[:2]
    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir()
    for stem in stems:  # links, not copies: the data stays where it is
        (tmp_path / "images" / f"{stem}.jpg").symlink_to(CONSEP_TEST / "images" / f"{stem}.jpg")
        (tmp_path / "masks" / f"{stem}.npz").symlink_to(CONSEP_TEST / "labels" / f"{stem}.npz")
    assert _run(tmp_path, "--class_map", CONSEP_MAP, "--tissue", "Colon") == 0
    images, masks, types = _load(tmp_path)
    assert images.shape == (2, 256, 256, 3) and list(types) == ["Colon", "Colon"]
    _check_pannuke_masks(masks)
    channel_of = {1: 3, 2: 1, 3: 0, 4: 2}  # CONSEP_MAP as PanNuke channels
    for i, stem in enumerate(stems):
        with np.load(CONSEP_TEST / "labels" / f"{stem}.npz") as npz:
            inst, ids, inst_type = npz["inst_map"], npz["inst_ids"], npz["inst_type"]
        assert np.array_equal(masks[i, ..., :NUM_TYPES].sum(axis=-1), inst.astype(np.float64))
        for nucleus_id, source_type in zip(ids.tolist(), inst_type.tolist(), strict=True):
            if (inst == nucleus_id).any():  # the dataset's own per-nucleus type agrees with the majority vote
                assert (masks[i, ..., channel_of[source_type]] == nucleus_id).any()


# ---------------------------------------------------------------- --split


def _split_run(lab: Path, out: Path, *extra: str) -> int:
    return main(["--images", str(lab / "images"), "--masks", str(lab / "masks"), "--output_dir", str(out), *extra])


def test_split_shares_whole_images_out_into_three_folds(tmp_path: Path) -> None:
    from pannuke_fixtures import write_lab_folder

    lab = write_lab_folder(tmp_path / "lab", images=10)
    assert _split_run(lab, tmp_path / "out", "--split", "0.8,0.1,0.1") == 0
    record = json.loads((tmp_path / "out" / "split.json").read_text())
    folds = {int(k): v for k, v in record["folds"].items()}
    assert [len(folds[f]) for f in (1, 2, 3)] == [8, 1, 1]
    assert sorted(sum(folds.values(), [])) == sorted(p.name for p in (lab / "images").iterdir())  # each image once
    for fold, names in folds.items():
        types = np.load(tmp_path / "out" / f"Fold {fold}" / "images" / f"fold{fold}" / "types.npy")
        assert len(types) == 2 * len(names)  # a 256x300 image gives 2 tiles, all in its own fold
    again = tmp_path / "again"
    assert _split_run(lab, again, "--split", "0.8,0.1,0.1") == 0
    assert json.loads((again / "split.json").read_text()) == record  # the seed makes the split reproducible


def test_split_gives_every_fold_an_image_and_refuses_too_few(tmp_path: Path, capsys) -> None:
    from pannuke_fixtures import write_lab_folder

    from scripts.data.pannuke.convert import split_pairs

    pairs = list(range(5))
    shares = split_pairs(pairs, (0.98, 0.01, 0.01), seed=0)
    assert sorted(len(v) for v in shares.values()) == [1, 1, 3] and sorted(sum(shares.values(), [])) == pairs
    lab = write_lab_folder(tmp_path / "lab", images=2)
    assert _split_run(lab, tmp_path / "out", "--split", "0.8,0.1,0.1") == 2
    assert "needs at least 3 images" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_split_writes_nothing_if_one_input_is_bad(tmp_path: Path, capsys) -> None:
    from pannuke_fixtures import write_lab_folder

    lab = write_lab_folder(tmp_path / "lab", images=6)
    (lab / "images" / "slide03.png").write_bytes(b"not a png")
    assert _split_run(lab, tmp_path / "out", "--split", "0.6,0.2,0.2") == 2
    assert "slide03.png" in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("Fold *"))


@pytest.mark.parametrize("bad", ["0.8,0.2", "a,b,c", "-1,1,1"])
def test_split_must_be_three_fractions(tmp_path: Path, bad: str) -> None:
    with pytest.raises(SystemExit):
        _split_run(tmp_path, tmp_path / "out", "--split", bad)


def test_split_and_append_do_not_mix(tmp_path: Path, capsys) -> None:
    from pannuke_fixtures import write_lab_folder

    lab = write_lab_folder(tmp_path / "lab", images=3)
    assert _split_run(lab, tmp_path / "out", "--split", "1,1,1", "--append") == 2
    assert "--append adds to one fold" in capsys.readouterr().err


# ---------------------------------------------------------------- full disks


def test_too_little_free_space_is_refused_before_writing(tmp_path: Path, capsys, monkeypatch) -> None:
    import shutil as sh

    _write_set(tmp_path, "a", (256, 256))
    monkeypatch.setattr(sh, "disk_usage", lambda p: sh._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    assert _run(tmp_path, "--class_map", CONSEP_MAP) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'out'}: writing 1 tiles needs 0.01 GB, but only 0.00 GB are free" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # no hidden temp fold left


def test_a_disk_that_fills_up_is_named_and_cleaned_up(tmp_path: Path, capsys, monkeypatch) -> None:
    import errno

    import scripts.data.pannuke.convert as convert

    _write_set(tmp_path, "a", (256, 256))

    def full(f, *args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(convert, "write_npy_header", full)
    assert _run(tmp_path, "--class_map", CONSEP_MAP) == 2
    err = capsys.readouterr().err
    assert "images.npy: the disk filled up while writing the fold" in err and "Traceback" not in err
    assert not any((tmp_path / "out").iterdir())


def test_a_written_fold_is_not_private(tmp_path: Path) -> None:
    import os
    import stat

    _write_set(tmp_path, "a", (256, 256))
    old = os.umask(0o022)
    try:
        assert _run(tmp_path, "--class_map", CONSEP_MAP) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out" / "Fold 1").stat().st_mode) == 0o755


def test_the_converter_needs_neither_torch_nor_monai():
    """A lab converts its annotations on any machine, quickly: the converter is numpy, scikit-image and PIL only."""
    code = (
        "import sys; sys.argv = ['convert', '--help']; import runpy\n"
        "try:\n    runpy.run_path('scripts/data/pannuke/convert.py', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "heavy = sorted(m for m in ('torch', 'monai', 'ignite') if m in sys.modules)\n"
        "print('HEAVY', heavy)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=BUNDLE, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--annotations" in proc.stdout and "HEAVY []" in proc.stdout
