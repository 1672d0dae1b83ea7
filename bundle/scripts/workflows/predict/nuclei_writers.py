"""Writers for one image's inference output: label maps and a PNG overlay.

Inputs shared by every writer (one image):
  inst         (H, W) integer instance map, 0 = background, one id per nucleus
  inst_types   (N+1,) uint8, inst_types[id] = type id 1..K of `classes` (PanNuke's 5 by default); index 0 unused
  inst_probs   (N+1,) float32, probability of the predicted type per id
  image        (H, W, 3) uint8 RGB

Outlines follow QuPath's conventions (qupath.py); the nucleus record (CSV rows and GeoJSON detections, images and
slides alike) is built and written in nucleus_record.py.

Every writer writes a temp file next to the target and renames it into place, so a reader never sees half a file,
and refuses to replace an existing file unless overwrite=True.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from scripts.core.atomic import atomic_write
from scripts.core.classes import PANNUKE, NucleusClasses

PathLike = str | os.PathLike

# ---------------------------------------------------------------- validation


def check_inst(inst: np.ndarray) -> np.ndarray:
    """Reject label maps that would silently write garbage (floats, 3-D, negative ids)."""
    inst = np.asarray(inst)
    if inst.ndim != 2:
        raise ValueError(f"inst must be a 2-D (H, W) instance map, got shape {inst.shape}")
    if not np.issubdtype(inst.dtype, np.integer):
        raise ValueError(f"inst must have an integer dtype, got {inst.dtype}")
    if inst.size and inst.min() < 0:
        raise ValueError("inst has negative ids; ids must be >= 0 (0 = background)")
    return inst


def check_per_instance(
    inst: np.ndarray, inst_types: np.ndarray, inst_probs: np.ndarray | None, classes: NucleusClasses = PANNUKE
) -> np.ndarray:
    """Check the per-id arrays cover every id in inst and every present type is one of `classes`; return ids."""
    ids = np.unique(inst)
    ids = ids[ids != 0]
    inst_types = np.asarray(inst_types)
    for name, arr in (("inst_types", inst_types), ("inst_probs", inst_probs)):
        if arr is not None and (np.ndim(arr) != 1 or len(arr) <= (int(ids.max()) if ids.size else 0)):
            raise ValueError(
                f"{name} must be 1-D with an entry for every id up to inst.max()={int(inst.max(initial=0))}, "
                f"got shape {np.shape(arr)}"
            )
    if ids.size:
        bad = ids[(inst_types[ids] < 1) | (inst_types[ids] > classes.num_types)]
        if bad.size:
            raise ValueError(
                f"inst_types must be 1..{classes.num_types} ({', '.join(classes.names)}) for every nucleus; ids "
                f"{bad[:10].tolist()} have types {inst_types[bad[:10]].tolist()}"
            )
    return ids


def _label_dtype(inst: np.ndarray) -> np.dtype:
    """Smallest unsigned type that keeps every id: uint16 for usual images, uint32 for whole slides."""
    top = int(inst.max(initial=0))
    if top >= 2**32:
        raise ValueError(f"inst max id {top} does not fit in uint32")
    return np.dtype(np.uint16) if top < 2**16 else np.dtype(np.uint32)


# ---------------------------------------------------------------- label maps


def write_label_tiff(path: PathLike, inst: np.ndarray, overwrite: bool = False) -> Path:
    """Lossless zlib TIFF of the instance map (uint16, or uint32 past 65535 ids) that QuPath and Fiji open."""
    import tifffile

    inst = check_inst(inst)
    data = inst.astype(_label_dtype(inst))
    return atomic_write(path, lambda tmp: tifffile.imwrite(tmp, data, compression="zlib"), overwrite)


def write_label_nifti(path: PathLike, inst: np.ndarray, overwrite: bool = False) -> Path:
    """NIfTI (.nii / .nii.gz) of the instance map for MONAI / 3D Slicer style tools.

    NIfTI's first axis is x, so the array is stored transposed, (W, H), as MONAI's own PNG -> NIfTI saving does;
    read it back with np.asarray(nib.load(path).dataobj).T.
    """
    import nibabel as nib

    inst = check_inst(inst)
    name = Path(path).name
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        raise ValueError(f"{path}: a NIfTI file name must end in .nii or .nii.gz")
    img = nib.Nifti1Image(np.ascontiguousarray(inst.T.astype(_label_dtype(inst))), affine=np.eye(4))
    img.header.set_intent("label")
    return atomic_write(path, lambda tmp: nib.save(img, str(tmp)), overwrite)


# ---------------------------------------------------------------- overlay


def overlay_image(
    image: np.ndarray, inst: np.ndarray, inst_types: np.ndarray, classes: NucleusClasses = PANNUKE
) -> np.ndarray:
    """Copy of image with each nucleus's inner boundary pixels painted in its type colour."""
    from skimage.segmentation import find_boundaries

    inst = check_inst(inst)
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8 RGB, got shape {image.shape} dtype {image.dtype}")
    if image.shape[:2] != inst.shape:
        raise ValueError(f"image is {image.shape[:2]} but inst is {inst.shape}; they must be the same size")
    check_per_instance(inst, inst_types, None, classes)
    out = image.copy()
    edge = find_boundaries(inst, mode="inner") & (inst > 0)
    palette = np.array([(0, 0, 0), *classes.colours], dtype=np.uint8)
    out[edge] = palette[np.asarray(inst_types)[inst[edge]]]
    return out


def overlay_png(
    path: PathLike,
    image: np.ndarray,
    inst: np.ndarray,
    inst_types: np.ndarray,
    overwrite: bool = False,
    classes: NucleusClasses = PANNUKE,
) -> Path:
    """PNG of overlay_image for a quick visual check of the predictions."""
    from PIL import Image

    picture = Image.fromarray(overlay_image(image, inst, inst_types, classes))
    # the fastest zlib level: a quick look needs no smaller file, and level 6 took a tenth of an image's time
    return atomic_write(path, lambda tmp: picture.save(tmp, format="PNG", compress_level=1), overwrite)
