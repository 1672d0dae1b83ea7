import numpy as np
import pytest

from pannuke_fixtures import rewrite, write_dataset
from scripts.data.pannuke.datasets import PanNuke, PanNukeDataset, as_fold_list
from scripts.core.errors import DataError


def test_fold_list_forms():
    assert as_fold_list(1) == [1]
    assert as_fold_list("1,3") == [1, 3]
    assert as_fold_list("[2]") == [2]
    assert as_fold_list([[1, 3], 2, np.int64(3)]) == [1, 3, 2, 3]


def test_dataset_items(tmp_path):
    root = write_dataset(tmp_path / "data")
    pannuke = PanNuke(root, tmp_path / "cache", [[1], 2, 3])
    ds = PanNukeDataset(pannuke, [1, 2], keys=("image", "type", "inst"))
    assert len(ds) == 5
    item = ds[4]
    assert item["fold"] == 2 and item["index"] == 1 and isinstance(item["tissue"], str)
    assert item["image"].shape == (256, 256, 3) and item["image"].dtype == np.uint8
    assert item["type"].shape == (256, 256) and item["inst"].dtype == np.uint16
    assert ds.tissues()[:3] == list(np.load(root / "Fold 1/images/fold1/types.npy"))


def test_every_fold_is_value_checked_up_front(tmp_path):
    """A bad test fold stops a training run before it starts, not at evaluation time."""
    root = write_dataset(tmp_path / "data")
    rewrite(root, 3, "images", lambda a: a / 255.0)
    with pytest.raises(DataError, match="Fold 3.*0-1 scale"):
        PanNuke(root, tmp_path / "cache", [1, 2, 3])


def demo_config(tmp_path, *overlays: str):
    from monai.bundle import ConfigParser

    from conftest import BUNDLE_ROOT

    parser = ConfigParser()
    parser.read_config([str(BUNDLE_ROOT / "configs" / name) for name in ("train.json", *overlays)])
    parser["bundle_root"], parser["cache_dir"] = str(tmp_path), str(tmp_path / "cache")
    return parser


def test_demo_json_trains_on_synthetic_data_written_on_first_use(tmp_path, caplog):
    parser = demo_config(tmp_path, "demo.json")
    pannuke = parser.get_parsed_content("pannuke")
    assert (tmp_path / "demo_data" / "DEMO_DATA_IS_SYNTHETIC.txt").is_file()
    assert "SYNTHETIC demo data" in caplog.text
    assert sorted(pannuke.caches) == [1, 2, 3]
    assert parser.get_parsed_content("ckpt_dir") == f"{tmp_path}/models/demo"  # never the real training's folder


def test_train_json_without_a_dataset_says_how_to_give_one(tmp_path):
    with pytest.raises(RuntimeError) as failed:  # MONAI's "Failed to instantiate", raised from the bundle's error
        demo_config(tmp_path).get_parsed_content("pannuke")
    assert isinstance(failed.value.__cause__, DataError)
    assert "pass --dataset_dir /path/to/pannuke" in str(failed.value.__cause__)
    assert "or add configs/demo.json" in str(failed.value.__cause__)
    assert not (tmp_path / "demo_data").exists()


def test_fold_not_prepared(tmp_path):
    root = write_dataset(tmp_path / "data")
    with pytest.raises(ValueError, match="fold 3 was not among"):
        PanNukeDataset(PanNuke(root, tmp_path / "cache", [1]), [3])


def test_a_missing_test_fold_is_optional_for_training_only(tmp_path, caplog):
    """A lab folder converted with --split 0.8,0.2,0 has no fold 3: training runs, evaluating it is refused."""
    import shutil

    root = write_dataset(tmp_path / "data")
    shutil.rmtree(root / "Fold 3")
    with caplog.at_level("INFO"):
        pannuke = PanNuke(root, tmp_path / "cache", [[1], 2, 3], optional_folds=[3])
    assert sorted(pannuke.caches) == [1, 2] and "has no fold 3" in caplog.text
    with pytest.raises(DataError, match="fold 3 not found"):
        PanNuke(root, tmp_path / "cache", [3])


@pytest.mark.parametrize("huge", [1e20, 2.0**62, np.int64(2**62)])
def test_instance_ids_too_large_to_relabel_are_refused(tmp_path, huge):
    """A nucleus id of 1e20 or 2**62 is an integer-valued float, but it overflows the relabelling (a nucleus would
    vanish or the background become one): refused before training, naming the file; also held as int64."""
    root = write_dataset(tmp_path / "data")
    dtype = np.int64 if isinstance(huge, np.integer) else np.float64

    def huge_ids(m):
        return np.concatenate([np.where(m[..., :1] > 0, huge, 0).astype(dtype), m[..., 1:].astype(dtype)], axis=-1)

    rewrite(root, 1, "masks", huge_ids)
    with pytest.raises(DataError, match=r"Fold 1/masks/fold1/masks.npy: an instance id of .* is beyond"):
        PanNuke(root, tmp_path / "cache", [1])


def test_a_file_where_the_cache_folder_goes_is_one_line(tmp_path):
    from scripts.core.errors import ConfigError

    root = write_dataset(tmp_path / "data")
    (tmp_path / "cache").write_text("not a folder")
    with pytest.raises(ConfigError, match=f"^--cache_dir {tmp_path / 'cache'} cannot be written"):
        PanNuke(root, tmp_path / "cache", [1])


def test_tissue_names_in_bytes_are_read_as_utf8_and_other_bytes_refused(tmp_path):
    import numpy as np

    root = write_dataset(tmp_path / "data")
    types = root / "Fold 1" / "images" / "fold1" / "types.npy"
    count = len(np.load(types))
    np.save(types, np.array(["Bile-duct".encode()] * count, dtype="S"))
    cache = PanNuke(root, tmp_path / "cache", [1]).caches[1]
    assert set(np.load(cache / "tissue.npy").tolist()) == {"Bile-duct"}
    np.save(types, np.array([b"\xff\xfeColon"] * count, dtype="S"))
    with pytest.raises(DataError, match=r"types.npy: tissue name b'\\xff\\xfeColon' is not UTF-8 text"):
        PanNuke(root, tmp_path / "cache2", [1])


def test_a_full_disk_while_building_the_cache_names_the_cache_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    from scripts.core.errors import DiskFullError
    from scripts.data.pannuke import cache

    root = write_dataset(tmp_path / "data")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache, "convert_fold", full)
    with pytest.raises(DiskFullError, match=r"^no space left on the disk while building the cache .* --cache_dir"):
        PanNuke(root, tmp_path / "cache", [1])
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]
