"""Write one image's inference outputs, as the last MONAI post transform, into `<output_dir>/<name>/`.

Per image (name = the input file's stem):
    <name>_instances.tif    lossless label map, one id per nucleus, same H x W as the input (uint16 / uint32)
    <name>_types.tif        PanNuke type 1..5 per nucleus pixel, 0 = background
    <name>_nuclei.geojson   QuPath detections, one classified polygon per nucleus
    <name>_nuclei.csv       one row per nucleus: the nucleus record (io/nucleus_record.py), as slides write it
    <name>_overlay.png      the input with each nucleus outlined in its type colour
    <name>_instances.nii.gz the label map as NIfTI, only with save_nifti=True
A transform rather than a handler so it runs inside the engine's per-image step, where PerImageGuard turns a failed
write into a reported, skipped image instead of a stopped run.

An image's outputs are complete or absent: they are all written into a hidden staging folder next to the image's
folder and moved into place only when every one of them was written, so a full disk or a crash mid-way leaves the
previous state (and no staging folder: it is removed on failure).  While the files are moved in, a `.incomplete`
flag sits in the image's folder, so a kill between two moves (a mixed old/new set) is not taken for a complete one:
the next run redoes the image.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from collections.abc import Hashable, Mapping
from pathlib import Path

import numpy as np
import torch
from monai.transforms import MapTransform

from scripts.core.classes import PANNUKE, NucleusClasses
from scripts.model.postprocess import as_plane
from scripts.core.errors import InferenceError
from scripts.core.flags import as_bool
from scripts.core.atomic import require_inside, require_writable
from scripts.workflows.predict.nuclei_writers import overlay_png, write_geojson, write_label_nifti, write_label_tiff
from scripts.workflows.predict.nucleus_record import image_nuclei, write_nuclei_csv

OUTPUT_SUFFIXES = {
    "instances": "_instances.tif",
    "types": "_types.tif",
    "geojson": "_nuclei.geojson",
    "csv": "_nuclei.csv",
    "overlay": "_overlay.png",
}
NIFTI_SUFFIX = "_instances.nii.gz"
INCOMPLETE_FLAG = ".incomplete"  # present in an image's folder while its outputs are being moved in


def _rgb(value: object) -> np.ndarray:
    """(H, W, 3) uint8 from the untouched copy of the input the config keeps next to the network's image."""
    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise ValueError(f"expected the input copy as (H, W, 3) uint8, got {array.shape} {array.dtype}")
    return array


class NucleiOutputsWriterd(MapTransform):
    """Write the files listed in the module docstring for one decollated item; refuse to replace existing ones.

    Adds `written` (the paths) and `num_nuclei` to the item, which the run summary reports.

    Args:
        output_dir: one folder per image goes here (`@output_dir`).
        overwrite: replace an image's existing outputs (`@overwrite`).
        save_nifti: also write the instance map as NIfTI (`@save_nifti`).
        tolerance: GeoJSON outlines simplified to within this many pixels (`@polygon_tolerance`).
        mpp: µm per pixel of the input images, for the µm columns (`@mpp`).
        classes: the model's classes (`@classes`): type names and colours in the GeoJSON, CSV and overlay.
    """

    def __init__(
        self,
        output_dir: str,
        overwrite: bool = False,
        save_nifti: bool = False,
        name_key: str = "name",
        image_key: str = "rgb",
        inst_key: str = "inst_map",
        type_key: str = "type_map",
        inst_types_key: str = "inst_types",
        inst_probs_key: str = "inst_probs",
        tolerance: float = 1.0,
        mpp: float = 0.25,
        classes: NucleusClasses = PANNUKE,
    ) -> None:
        super().__init__(keys=inst_key)
        self.classes = classes
        self.output_dir = require_writable(output_dir, "output_dir")
        self.tolerance = float(tolerance)  # GeoJSON outlines simplified to within this many pixels
        self.mpp = float(mpp)
        self.overwrite = as_bool(overwrite, "overwrite")  # --overwrite false must not mean True
        self.save_nifti = as_bool(save_nifti, "save_nifti")
        self.name_key, self.image_key = name_key, image_key
        self.inst_key, self.type_key = inst_key, type_key
        self.inst_types_key, self.inst_probs_key = inst_types_key, inst_probs_key

    def paths(self, name: str) -> dict[str, Path]:
        """Every file written for the image `name`."""
        folder = self.output_dir / name
        paths = {kind: folder / f"{name}{suffix}" for kind, suffix in OUTPUT_SUFFIXES.items()}
        if self.save_nifti:
            paths["nifti"] = folder / f"{name}{NIFTI_SUFFIX}"
        return paths

    def existing(self, name: str) -> list[Path]:
        """Outputs of `name` already on disk."""
        return [p for p in self.paths(name).values() if p.exists()]

    def missing(self, name: str) -> list[Path]:
        """Outputs of `name` not on disk (the NIfTI copy, an option, does not make a set incomplete)."""
        return [p for kind, p in self.paths(name).items() if kind != "nifti" and not p.exists()]

    def complete(self, name: str) -> bool:
        """Every output of `name` is on disk and no move into its folder was interrupted: a run without overwrite
        leaves such an image alone."""
        return not self.missing(name) and not (self.output_dir / name / INCOMPLETE_FLAG).exists()

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        name = str(d[self.name_key])
        inst = as_plane(d[self.inst_key])
        type_map = as_plane(d[self.type_key])
        inst_types, inst_probs = np.asarray(d[self.inst_types_key]), np.asarray(d[self.inst_probs_key])
        image = _rgb(d[self.image_key])
        if image.shape[:2] != inst.shape:
            raise ValueError(f"{name}: label map {inst.shape} differs from the input {image.shape[:2]}")
        if not self.overwrite and self.complete(name):
            raise FileExistsError(f"{name}: outputs exist in {self.output_dir / name}; pass --overwrite true")
        paths = self.paths(name)
        folder = paths["instances"].parent
        require_inside(self.output_dir, folder, InferenceError)
        folder.parent.mkdir(parents=True, exist_ok=True)
        # staging folders left by a killed run (a failed one removes its own)
        for stale in folder.parent.glob(f".{glob.escape(name)}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=folder.parent))
        try:
            staged = {kind: staging / path.name for kind, path in paths.items()}
            write_label_tiff(staged["instances"], inst)
            write_label_tiff(staged["types"], type_map)
            table, geojson = image_nuclei(inst, inst_types, inst_probs, self.classes, self.mpp, self.tolerance)
            write_geojson(staged["geojson"], geojson)
            write_nuclei_csv(staged["csv"], table)
            overlay_png(staged["overlay"], image, inst, inst_types, classes=self.classes)
            if self.save_nifti:
                write_label_nifti(staged["nifti"], inst)
            folder.mkdir(exist_ok=True)
            flag = folder / INCOMPLETE_FLAG
            require_inside(self.output_dir, flag, InferenceError)  # touch() would create a link's target
            flag.touch()  # a kill between two moves leaves a mixed old/new set: the flag marks it incomplete
            for kind, path in paths.items():  # renames within one file system: no space needed, nothing half-written
                os.replace(staged[kind], path)
            flag.unlink()
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        d["written"] = list(paths.values())
        d["num_nuclei"] = int(np.count_nonzero(np.bincount(inst.ravel())[1:]))
        return d
