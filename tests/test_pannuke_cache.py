import json
import os

import numpy as np
import pytest

from pannuke_fixtures import fold_path, rewrite, write_dataset
from scripts.data.pannuke.cache import ensure_fold_cache, open_fold_cache
from scripts.core.errors import DataError
from scripts.data.pannuke.files import locate_folds
from scripts.data.pannuke.cache import masks_to_instances


def _cache(root, tmp_path, fold=1):
    return ensure_fold_cache(locate_folds(root, [fold])[fold], tmp_path / "cache")


@pytest.mark.parametrize("layout", ["official", "kaggle"])
def test_cache_holds_the_fold(tmp_path, layout):
    root = write_dataset(tmp_path / "data", layout=layout)
    cache = open_fold_cache(_cache(root, tmp_path))
    images = np.load(fold_path(root, 1, "images", layout))
    masks = np.load(fold_path(root, 1, "masks", layout))
    assert cache["image"].dtype == np.uint8 and np.array_equal(cache["image"], images.astype(np.uint8))
    for i in range(len(images)):
        inst, types = masks_to_instances(masks[i])
        assert np.array_equal(cache["inst"][i], inst)
        assert np.array_equal(cache["type"][i], types)
        # every PanNuke nucleus (channel, id) is one cached instance
        n_source = sum(len(np.unique(masks[i, ..., c])) - 1 for c in range(5))
        assert cache["inst"][i].max() == n_source
    assert list(cache["tissue"]) == list(np.load(fold_path(root, 1, "types", layout)))


def test_cache_is_reused_and_rebuilt_when_source_changes(tmp_path):
    root = write_dataset(tmp_path / "data")
    first = _cache(root, tmp_path)
    stamp = (first / "meta.json").stat().st_mtime_ns
    assert _cache(root, tmp_path) == first and (first / "meta.json").stat().st_mtime_ns == stamp
    rewrite(root, 1, "images", lambda a: 255 - a)
    rebuilt = _cache(root, tmp_path)
    assert json.loads((rebuilt / "meta.json").read_text())["tiles"] == 3
    assert np.array_equal(open_fold_cache(rebuilt)["image"], np.load(fold_path(root, 1, "images")).astype(np.uint8))


def test_zero_one_images_rejected(tmp_path):
    root = write_dataset(tmp_path / "data")
    rewrite(root, 1, "images", lambda a: a / 255.0)
    with pytest.raises(DataError, match="0-1 scale.*Multiply by 255"):
        _cache(root, tmp_path)


def test_nan_image_rejected_with_tile_index(tmp_path):
    root = write_dataset(tmp_path / "data")

    def poison(a):
        a[2, 10, 10, 1] = np.nan
        return a

    rewrite(root, 1, "images", poison)
    with pytest.raises(DataError, match="images.npy: tile 2 holds NaN"):
        _cache(root, tmp_path)


def test_nan_mask_rejected(tmp_path):
    root = write_dataset(tmp_path / "data")

    def poison(a):
        a[1, 0, 0, 3] = np.nan
        return a

    rewrite(root, 1, "masks", poison)
    with pytest.raises(DataError, match="masks.npy.*NaN"):
        _cache(root, tmp_path)


def test_interpolated_masks_rejected(tmp_path):
    root = write_dataset(tmp_path / "data")
    rewrite(root, 1, "masks", lambda a: a * 0.5)
    with pytest.raises(DataError, match="integer instance ids"):
        _cache(root, tmp_path)


def test_failed_conversion_leaves_no_cache(tmp_path):
    root = write_dataset(tmp_path / "data")
    rewrite(root, 1, "images", lambda a: a / 255.0)
    with pytest.raises(DataError):
        _cache(root, tmp_path)
    assert not any((tmp_path / "cache").iterdir())


class _Payload:
    """What a hostile types.npy can hold: unpickling it runs os.system, which here only creates a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_object_array_tissue_names_are_refused_without_unpickling(tmp_path):
    """An object array needs pickle, and pickle runs code: refused with the file named and the fix, nothing run."""
    root = write_dataset(tmp_path / "data")
    marker = tmp_path / "code_ran"
    rewrite(root, 1, "types", lambda a: np.array([_Payload(str(marker))] * len(a), dtype=object))
    with pytest.raises(DataError, match="object array.*never does.*np.save") as error:
        _cache(root, tmp_path)
    assert str(fold_path(root, 1, "types")) in str(error.value)
    assert not marker.exists()
    # the fix the message gives, on a file of plain names stored as objects, makes the fold usable
    path = fold_path(root, 1, "types")
    np.save(path, np.array(["Breast", "Colon", "Lung"], dtype=object), allow_pickle=True)
    np.save(path, np.array(np.load(path, allow_pickle=True), dtype=str))
    cache = open_fold_cache(_cache(root, tmp_path))
    assert cache["tissue"].dtype.kind == "U" and len(cache["tissue"]) == 3


def test_large_chunked_fold_matches(tmp_path, monkeypatch):
    """Chunk boundaries do not shift tiles: a fold longer than one chunk converts exactly."""
    import scripts.data.pannuke.cache as pc

    monkeypatch.setattr(pc, "CHUNK_TILES", 2)
    root = write_dataset(tmp_path / "data", tiles=(5, 1, 1))
    cache = open_fold_cache(_cache(root, tmp_path))
    assert np.array_equal(cache["image"], np.load(fold_path(root, 1, "images")).astype(np.uint8))
    assert os.path.getsize(_cache(root, tmp_path) / "image.npy") > 5 * 256 * 256 * 3


# ---------------------------------------------------------------- integrity


def _fresh_process(monkeypatch):
    """A new process has checked no checksum yet."""
    import scripts.data.pannuke.cache as pc

    monkeypatch.setattr(pc, "_VERIFIED", set())


def _expected_image(root):
    return np.load(fold_path(root, 1, "images")).astype(np.uint8)


@pytest.mark.parametrize("damage", ["truncate", "overwrite", "meta_truncated", "meta_missing", "file_missing"])
def test_a_damaged_cache_is_rebuilt_with_a_log_line(tmp_path, monkeypatch, caplog, damage):
    root = write_dataset(tmp_path / "data")
    cache = _cache(root, tmp_path)
    image = cache / "image.npy"
    if damage == "truncate":
        os.truncate(image, image.stat().st_size // 2)
    elif damage == "overwrite":  # same size, other bytes: only the checksum sees it
        with open(image, "r+b") as f:
            f.seek(-1000, os.SEEK_END)
            f.write(b"\xff" * 1000)
    elif damage == "meta_truncated":
        meta = cache / "meta.json"
        meta.write_text(meta.read_text()[:40])
    elif damage == "meta_missing":
        (cache / "meta.json").unlink()
    else:
        (cache / "type.npy").unlink()
    _fresh_process(monkeypatch)
    with caplog.at_level("WARNING"):
        rebuilt = _cache(root, tmp_path)
    assert "rebuilding it" in caplog.text and str(cache) in caplog.text
    assert np.array_equal(open_fold_cache(rebuilt)["image"], _expected_image(root))


def test_a_source_swapped_with_the_same_size_and_mtime_is_noticed(tmp_path):
    root = write_dataset(tmp_path / "data")
    _cache(root, tmp_path)
    path = fold_path(root, 1, "images")
    stat = path.stat()
    swapped = tmp_path / "swapped.npy"
    np.save(swapped, 255 - np.load(path))
    os.replace(swapped, path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    assert np.array_equal(open_fold_cache(_cache(root, tmp_path))["image"], _expected_image(root))


def test_temporaries_of_a_killed_build_are_removed(tmp_path):
    root = write_dataset(tmp_path / "data")
    cache = _cache(root, tmp_path)
    orphan = cache.with_name(f"{cache.name}.tmp99999999")
    orphan.mkdir()
    (orphan / "image.npy").write_bytes(b"half")
    rewrite(root, 1, "images", lambda a: 255 - a)  # the next build runs, and cleans up first
    _cache(root, tmp_path)
    assert not orphan.exists()
    assert not list(cache.parent.glob("*.lock"))


def test_a_second_run_waits_for_the_build_and_uses_it(tmp_path, monkeypatch):
    """Another live process holds the build lock: this run waits, then finds the cache built."""
    import subprocess
    import sys

    import scripts.data.pannuke.cache as pc
    from scripts.core.errors import ConfigError

    root = write_dataset(tmp_path / "data")
    files = locate_folds(root, [1])[1]
    lock = pc.cache_path(files, tmp_path / "cache").with_name(pc.cache_path(files, tmp_path / "cache").name + ".lock")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        lock.parent.mkdir(parents=True)
        lock.write_text(json.dumps({"pid": holder.pid, "host": __import__("socket").gethostname(), "command": "x"}))
        monkeypatch.setattr(pc, "BUILD_WAIT_S", 0.5)
        with pytest.raises(ConfigError, match=rf"in use by another run \(pid {holder.pid}"):
            _cache(root, tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert _cache(root, tmp_path).is_dir()  # the holder is gone: its lock is stale and taken over


def test_overlapping_type_channels_are_recorded_and_scored_on_the_raw_channels(tmp_path, caplog):
    """Where PanNuke's channels share a pixel the cache keeps one type, so the scorer reads the raw channels."""
    from types import SimpleNamespace

    from test_pannuke_metric import _overlapping_masks

    from scripts.data.pannuke.cache import overlapping_tiles
    from scripts.data.pannuke.datasets import PanNuke
    from scripts.workflows.evaluate.pq import score_image
    from scripts.workflows.evaluate.score_handler import PanNukeScoreHandler

    root = write_dataset(tmp_path / "data")
    raw = np.zeros((256, 256, 6))
    raw[:64, :64] = _overlapping_masks()
    raw[64:, :, 5] = 1
    raw[:64, 64:, 5] = 1
    rewrite(root, 3, "masks", lambda a: np.concatenate([raw[None], a[1:]]))
    with caplog.at_level("WARNING"):
        pannuke = PanNuke(root, tmp_path / "cache", folds=[3])
    assert overlapping_tiles(pannuke.cache(3)) == {0} and "1 tiles have pixels in two type channels" in caplog.text
    cache = open_fold_cache(pannuke.cache(3))
    pred_inst = np.zeros((256, 256), np.int32)
    pred_inst[10:21, 10:21] = 1
    pred_type = (pred_inst > 0).astype(np.int32)
    handler = PanNukeScoreHandler(str(tmp_path / "eval"), pannuke=pannuke)
    items = [
        {"fold": 3, "index": i, "tissue": "Breast", "inst": cache["inst"][i], "type": cache["type"][i]} for i in (0, 1)
    ]
    outputs = [{"inst_map": pred_inst, "type_map": pred_type}] * 2
    handler.score_batch(SimpleNamespace(state=SimpleNamespace(batch=items, output=outputs)))
    official = score_image(cache["inst"][0], cache["type"][0], pred_inst, pred_type, raw[..., :5])
    assert handler.rows[0]["PQ_Neoplastic"] == official["PQ_Neoplastic"] == pytest.approx(1.0)
    plain = score_image(cache["inst"][1], cache["type"][1], pred_inst, pred_type)  # a tile without overlap
    assert handler.rows[1].keys() == plain.keys()
    np.testing.assert_array_equal(list(handler.rows[1].values()), list(plain.values()))  # NaN-aware
