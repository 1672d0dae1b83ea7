"""A lab's own classes end to end, in-process: QuPath GeoJSON -> folds with classes.json -> fine-tuning from the
shipped model (finetune.json) -> a checkpoint that carries the class names -> tile and slide inference that write
exactly those names, and scores per class named after them."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow
from PIL import Image

from conftest import BUNDLE_ROOT
from pannuke_fixtures import write_lab_folder
from scripts.core.classes import NucleusClasses, checkpoint_classes
from scripts.model.weights import start_from
from scripts.core.errors import ModelError, bundle_error_in
from scripts.data.pannuke.annotations import annotations_geojson
from scripts.data.pannuke.convert import main as convert
from slide_fixtures import write_slide

pytestmark = pytest.mark.slow

CONFIGS = BUNDLE_ROOT / "configs"
SHIPPED = BUNDLE_ROOT / "models" / "pretrained" / "model_fp16.pt"
LAB_NAMES = ("Immune", "Tumour")  # sorted, as the converter orders the names it finds
# the lab's two classes from the synthetic PanNuke types: Inflammatory -> Immune, everything else -> Tumour
LAB_COLOURS = {"Tumour": (230, 20, 20), "Immune": (20, 20, 230)}


def workflow(configs: list[str], kind: str, **overrides) -> ConfigWorkflow:
    flow = ConfigWorkflow(
        config_file=[str(CONFIGS / c) for c in configs],
        workflow_type=kind,
        meta_file=str(CONFIGS / "metadata.json"),
        bundle_root=str(BUNDLE_ROOT),
        num_workers=0,
        **overrides,
    )
    flow.initialize()
    return flow


def run(configs: list[str], kind: str, **overrides) -> None:
    flow = workflow(configs, kind, **overrides)
    flow.run()
    flow.finalize()


def qupath_export(lab: Path) -> Path:
    """The lab folder's masks as QuPath "Export objects as GeoJSON" files with the lab's two class names."""
    out = lab / "geojson"
    out.mkdir()
    for npz in sorted((lab / "masks").glob("*.npz")):
        label = np.load(npz)
        inst, types = label["inst_map"], label["type_map"]
        names = {int(i): "Immune" if types[inst == i][0] == 2 else "Tumour" for i in np.unique(inst[inst > 0])}
        (out / f"{npz.stem}.geojson").write_text(json.dumps(annotations_geojson(inst, names, LAB_COLOURS)))
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    work = tmp_path_factory.mktemp("lab_classes")
    lab = write_lab_folder(work / "lab", images=6, shape=(256, 300))
    geojson = qupath_export(lab)
    args = ["--images", str(lab / "images"), "--annotations", str(geojson), "--output_dir", str(work / "data")]
    assert convert([*args, "--split", "0.6,0.4,0"]) == 0  # as the README says: no test fold, training runs
    shipped_before = sha256(SHIPPED)
    run(
        ["train.json", "finetune.json"],
        "train",
        dataset_dir=str(work / "data"),
        cache_dir=str(work / "cache"),
        ckpt_dir=str(work / "models"),
        output_dir=str(work / "eval"),
        epochs=2,
        batch_size=2,
    )
    assert sha256(SHIPPED) == shipped_before, "fine-tuning must never touch the shipped model"
    return work


def test_converted_folds_carry_the_lab_classes_and_qupath_colours(finetuned):
    classes = json.loads((finetuned / "data" / "classes.json").read_text())
    assert classes == {"names": list(LAB_NAMES), "colours": [list(LAB_COLOURS[n]) for n in LAB_NAMES]}
    masks = np.load(finetuned / "data" / "Fold 1" / "masks" / "fold1" / "masks.npy", mmap_mode="r")
    assert masks.shape[-1] == 3  # two classes and the background


def test_the_checkpoint_carries_its_classes_and_loads_weights_only(finetuned):
    path = finetuned / "models" / "model.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    classes = checkpoint_classes(state, path)
    assert classes.names == LAB_NAMES and classes.colours == tuple(LAB_COLOURS[n] for n in LAB_NAMES)
    assert state["final_conv.weight"].shape[0] == 1 + 2 + 2  # background, two types, HV maps
    network = workflow(["train.json", "inference.json"], "infer", ckpt_dir=str(finetuned / "models")).parser
    network.get_parsed_content("network_def").load_state_dict(state, strict=True)


def test_tile_and_slide_outputs_use_exactly_the_lab_names(finetuned, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    pixels = write_slide(tmp_path / "slides" / "case.ome.tif", size=(768, 768), tissue=(128, 128, 640, 640))
    Image.fromarray(pixels[128:640, 128:640]).save(images / "field.png")
    common = {"ckpt_dir": str(finetuned / "models")}
    run(["train.json", "inference.json"], "infer", input_dir=str(images), output_dir=str(tmp_path / "t"), **common)
    wsi = ["train.json", "inference.json", "inference_wsi.json"]
    run(wsi, "infer", input_dir=str(tmp_path / "slides"), output_dir=str(tmp_path / "s"), tile_size=256, **common)
    outputs = {
        "tile": (tmp_path / "t" / "field" / "field_nuclei.geojson", tmp_path / "t" / "field" / "field_nuclei.csv"),
        "slide": (tmp_path / "s" / "case" / "case_nuclei.geojson", tmp_path / "s" / "case" / "case_nuclei.csv"),
    }
    for kind, (geojson, table) in outputs.items():
        features = json.loads(geojson.read_text())["features"]
        assert features, f"{kind}: no nucleus found"
        classified = [f["properties"]["classification"] for f in features]
        found = {(c["name"], tuple(c["color"])) for c in classified}
        assert {name for name, _ in found} <= set(LAB_NAMES), kind
        assert all(colour == LAB_COLOURS[name] for name, colour in found), kind
        with open(table, newline="") as f:
            assert {row["type"] for row in csv.DictReader(f)} <= set(LAB_NAMES), kind
    summary = json.loads((tmp_path / "s" / "case" / "case_summary.json").read_text())
    assert list(summary["nuclei_per_type"]) == list(LAB_NAMES)


def test_asking_for_other_classes_is_refused_with_the_checkpoint_named(finetuned, tmp_path):
    with pytest.raises(Exception) as err:
        workflow(
            ["train.json", "inference.json"],
            "infer",
            ckpt_dir=str(finetuned / "models"),
            input_dir=str(tmp_path),
            output_dir=str(tmp_path / "o"),
            class_names=["Neoplastic", "Immune"],
        ).parser.get_parsed_content("classes")
    message = str(bundle_error_in(err.value))
    assert "trained on the classes ['Immune', 'Tumour']" in message and "model.pt" in message


def evaluate(work: Path, out: Path, **overrides) -> None:
    """evaluate.json on the lab's validation fold (the folder has no test fold)."""
    data = {"dataset_dir": str(work / "data"), "cache_dir": str(work / "cache"), "ckpt_dir": str(work / "models")}
    run(["train.json", "evaluate.json"], "infer", output_dir=str(out), test_fold=2, **data, **overrides)


def test_scores_are_per_lab_class(finetuned):
    out = finetuned / "scores"
    evaluate(finetuned, out)
    scores = json.loads((out / "pannuke_scores.json").read_text())
    assert list(scores["per_class"]) == list(LAB_NAMES)
    assert "PQ_Immune" in (out / "pannuke_scores_per_image.csv").read_text().splitlines()[0]


def test_a_shipped_checkpoint_is_refused_on_data_of_other_classes(finetuned):
    with pytest.raises(Exception) as err:
        evaluate(finetuned, finetuned / "other", checkpoint=str(SHIPPED))
    message = str(bundle_error_in(err.value))
    assert "model_fp16.pt was trained on the classes ['Neoplastic'" in message and "['Immune', 'Tumour']" in message


def test_start_from_keeps_every_layer_and_the_types_it_knows():
    import monai

    shipped = torch.load(SHIPPED, map_location="cpu", weights_only=True)

    def network(out_channels: int) -> torch.nn.Module:
        return monai.networks.nets.BasicUNet(2, 3, out_channels, (16, 16, 32, 64, 128, 16), norm="batch", dropout=0.1)

    torch.manual_seed(0)
    lab = network(1 + 2 + 2)
    fresh = lab.state_dict()["final_conv.weight"].clone()
    start_from(lab, str(SHIPPED), NucleusClasses(["Tumour", "inflammatory"]))
    state = lab.state_dict()
    for key, value in shipped.items():
        if not key.startswith("final_conv."):
            assert torch.equal(state[key].to(value.dtype), value), key
    head, old = state["final_conv.weight"].half(), shipped["final_conv.weight"]
    assert torch.equal(head[0], old[0]) and torch.equal(head[3:], old[6:])  # background and the HV maps
    assert torch.equal(head[2], old[2])  # "inflammatory" is the shipped model's Inflammatory channel
    assert torch.equal(state["final_conv.weight"][1], fresh[1])  # "Tumour" is new: freshly initialised
    with pytest.raises(ModelError, match="not made for this network"):
        narrow = monai.networks.nets.BasicUNet(2, 3, 8, (8, 8, 16, 32, 64, 8), norm="batch", dropout=0.1)
        start_from(narrow, str(SHIPPED))
    with pytest.raises(ModelError, match="another target"):  # the boundary target: background, 5 types, outline
        start_from(network(7), str(SHIPPED))
