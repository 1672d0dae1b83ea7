"""MONAI's bundle properties, checked in-process as the Model Zoo's ci/unit_tests do: the train and inference
workflows define the standard ids (train#trainer, train#dataset, ...; dataset, inferer, postprocessing, evaluator)
that MONAI's tools and other bundles' code look for."""

from __future__ import annotations

import numpy as np
from monai.bundle import ConfigWorkflow
from PIL import Image

from conftest import BUNDLE_ROOT
from pannuke_fixtures import write_dataset
from scripts.data.pannuke.demo_data import make_tile

CONFIGS = BUNDLE_ROOT / "configs"


def test_train_workflow_has_the_standard_properties(tmp_path):
    data = write_dataset(tmp_path / "data")
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "train.json"),
        workflow_type="train",
        meta_file=str(CONFIGS / "metadata.json"),
        bundle_root=str(BUNDLE_ROOT),
        dataset_dir=str(data),
        cache_dir=str(tmp_path / "cache"),
        ckpt_dir=str(tmp_path / "models"),
        output_dir=str(tmp_path / "eval"),
        num_workers=0,
    )
    workflow.initialize()
    assert workflow.check_properties() == []
    assert workflow.max_epochs == 100 and len(workflow.train_dataset) == 3


def test_inference_workflow_has_the_standard_properties_and_runs(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(make_tile(np.random.default_rng(5))[0].astype(np.uint8)).save(images / "tile.png")
    workflow = ConfigWorkflow(
        config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "inference.json")],
        workflow_type="infer",
        meta_file=str(CONFIGS / "metadata.json"),
        bundle_root=str(BUNDLE_ROOT),
        input_dir=str(images),
        output_dir=str(tmp_path / "out"),
        ckpt_dir=str(tmp_path / "models"),
        num_workers=0,
    )
    workflow.initialize()
    assert workflow.check_properties() == []
    assert len(workflow.dataset) == 1
    workflow.run()  # with the shipped model: nothing was trained in ckpt_dir
    workflow.finalize()
    assert (tmp_path / "out" / "tile" / "tile_nuclei.geojson").is_file()


def test_whole_slide_workflow_has_the_standard_properties(tmp_path):
    from slide_fixtures import write_slide

    write_slide(tmp_path / "slides" / "s.ome.tif", size=(768, 768), tissue=(256, 256, 512, 512))
    workflow = ConfigWorkflow(
        config_file=[str(CONFIGS / c) for c in ("train.json", "inference.json", "inference_wsi.json")],
        workflow_type="infer",
        meta_file=str(CONFIGS / "metadata.json"),
        bundle_root=str(BUNDLE_ROOT),
        input_dir=str(tmp_path / "slides"),
        output_dir=str(tmp_path / "out"),
        ckpt_dir=str(tmp_path / "models"),
        num_workers=0,
        tile_size=256,
    )
    workflow.initialize()
    assert workflow.check_properties() == []
    assert len(workflow.dataset) == 1  # the one 256² tile of tissue, nothing of the glass around it
