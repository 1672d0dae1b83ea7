import os

import numpy as np
import pytest

from pannuke_fixtures import fold_path, rewrite, write_dataset
from scripts.core.errors import DataError
from scripts.data.pannuke.demo_data import write_demo_dataset
from scripts.data.pannuke.files import locate_folds


@pytest.mark.parametrize("layout", ["official", "kaggle"])
def test_finds_both_layouts(tmp_path, layout):
    write_dataset(tmp_path, layout=layout)
    found = locate_folds(tmp_path, [1, 2, 3])
    assert sorted(found) == [1, 2, 3]
    assert {f.layout for f in found.values()} == {layout}
    assert found[2].images == fold_path(tmp_path, 2, "images", layout)


def test_missing_fold_names_paths_tried(tmp_path):
    write_dataset(tmp_path)
    os.remove(fold_path(tmp_path, 3, "images"))
    os.remove(fold_path(tmp_path, 3, "masks"))
    with pytest.raises(DataError, match=r"fold 3 not found.*Fold 3/images/fold3/images.npy.*Part 3"):
        locate_folds(tmp_path, [1, 2, 3])


def test_incomplete_fold_names_missing_file(tmp_path):
    write_dataset(tmp_path)
    os.remove(fold_path(tmp_path, 2, "types"))
    with pytest.raises(DataError, match="incomplete.*types.npy"):
        locate_folds(tmp_path, [2])


def test_truncated_file(tmp_path):
    write_dataset(tmp_path)
    path = fold_path(tmp_path, 1, "masks")
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1000)
    with pytest.raises(DataError, match=r"masks.npy: truncated"):
        locate_folds(tmp_path, [1])


def test_a_header_that_does_not_describe_its_data(tmp_path):
    """float64 data under a float32 header of the same shape: twice the bytes, every value read wrong."""
    write_dataset(tmp_path)
    path = fold_path(tmp_path, 1, "images")
    data = np.load(path)
    with open(path, "wb") as f:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False}
        np.lib.format.write_array_header_1_0(f, {**header, "shape": data.shape})
        f.write(data.astype(np.float64).tobytes())
    with pytest.raises(DataError, match=r"images.npy: the header promises .* float32 .* does not describe its data"):
        locate_folds(tmp_path, [1])


def test_wrong_shape(tmp_path):
    write_dataset(tmp_path)
    rewrite(tmp_path, 1, "images", lambda a: a[:, :128])
    with pytest.raises(DataError, match=r"images.npy: expected shape \(N, 256, 256, 3\).*\(3, 128, 256, 3\)"):
        locate_folds(tmp_path, [1])


def test_masks_without_background_channel(tmp_path):
    write_dataset(tmp_path)
    rewrite(tmp_path, 1, "masks", lambda a: a[..., :5])
    with pytest.raises(DataError, match="masks.npy: expected shape"):
        locate_folds(tmp_path, [1])


def test_mismatched_counts(tmp_path):
    write_dataset(tmp_path)
    rewrite(tmp_path, 1, "types", lambda a: a[:-1])
    with pytest.raises(DataError, match="tile counts differ.*images.npy has 3.*types.npy has 2"):
        locate_folds(tmp_path, [1])


def test_not_a_folder(tmp_path):
    with pytest.raises(DataError, match="is not a folder"):
        locate_folds(tmp_path / "nope", [1])


def test_unknown_fold(tmp_path):
    write_dataset(tmp_path)
    with pytest.raises(DataError, match="fold 4 does not exist"):
        locate_folds(tmp_path, [4])


def test_not_npy(tmp_path):
    write_dataset(tmp_path)
    fold_path(tmp_path, 1, "images").write_bytes(b"PK\x03\x04 this is a zip")
    with pytest.raises(DataError, match="not a readable .npy"):
        locate_folds(tmp_path, [1])


def test_float32_and_uint8_sources_accepted(tmp_path):
    write_dataset(tmp_path)
    rewrite(tmp_path, 1, "images", lambda a: a.astype(np.uint8))
    rewrite(tmp_path, 1, "masks", lambda a: a.astype(np.float32))
    assert locate_folds(tmp_path, [1])[1].fold == 1


def test_both_layouts_present_is_said(tmp_path, caplog):
    write_demo_dataset(tmp_path, tiles_per_fold=(1, 1, 1), layout="official")
    write_demo_dataset(tmp_path, tiles_per_fold=(1, 1, 1), layout="kaggle")
    with caplog.at_level("WARNING"):
        files = locate_folds(tmp_path, [1])
    assert files[1].layout == "official" and "both layouts" in caplog.text


def test_fortran_ordered_arrays_are_read_not_refused(tmp_path):
    import numpy as np

    from scripts.data.pannuke.cache import read_tiles
    from scripts.data.pannuke.files import check_fold_headers, read_npy_header

    write_demo_dataset(tmp_path, tiles_per_fold=(3, 1, 1))
    files = locate_folds(tmp_path, [1])[1]
    images = np.load(files.images)
    np.save(files.images, np.asfortranarray(images))
    assert check_fold_headers(files) == 3
    header = read_npy_header(files.images)
    assert header.fortran_order
    np.testing.assert_array_equal(read_tiles(files.images, header, 1, 3), images[1:3])


def test_an_unreadable_fold_folder_is_one_line_naming_it(tmp_path, monkeypatch):
    """As root every folder is readable, so the refusal pathlib gives another account is simulated."""
    import pathlib

    from scripts.data.pannuke.datasets import PanNuke

    write_demo_dataset(tmp_path / "data", tiles_per_fold=(1, 1, 1))
    real_stat = pathlib.Path.stat

    def stat(self, *args, **kwargs):
        if "Fold 2" in self.parts and self.name != "Fold 2":  # Fold 2 itself is listed, its contents not
            raise PermissionError(13, "Permission denied", str(self))
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "stat", stat)
    with pytest.raises(DataError, match=r"Fold 2/.*cannot be read \(Permission denied\).*chmod -R u\+rX"):
        locate_folds(tmp_path / "data", [1, 2])
    with pytest.raises(DataError, match="cannot be read"):
        PanNuke(tmp_path / "data", tmp_path / "cache", [1, 2])
    assert sorted(locate_folds(tmp_path / "data", [1, 3])) == [1, 3]  # the readable folds are still found
