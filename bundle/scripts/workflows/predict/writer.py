"""The last post transform of image and slide inference alike: the one writer.

Every item the network finished is one tile of a source: an image is one tile whose core is the whole image, a slide
is many tiles (stardist's `big.py` idea).  The writer asks the run's outputs which tile of which source the item is
(`outputs.start`), hands the prediction to the tile post-processing (`TileNucleiPool`: instances, the nuclei whose
centroid lies in the tile's core, their records and outlines; in this process or in a pool while the network goes
on) and gives each finished tile's nuclei to the outputs in submission order (`outputs.add`).  A tile whose
post-processing or writing fails fails its source alone (`outputs.tile_failed`); the others go on.  So does one the
reader could not read: its dataset record carries the message (and a stand-in image through the network), and
`outputs.start` fails its source.  This is the whole of per-image and per-slide error isolation: MONAI's evaluator
runs unchanged.

The outputs say what is written, and when a source is done:
  `ImageOutputs` (image_outputs.py)    an image's folder of label maps, nuclei and overlay, all or nothing
  `SlideOutputs` (slides/outputs.py)   a slide's nuclei appended tile by tile, resumable, finished on its last tile
Both write the same nucleus record (nucleus_record.py): the same CSV columns, GeoJSON and centroid convention.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Protocol

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform

from scripts.workflows.predict.tile_nuclei import TileJob, TileNuclei, TileNucleiPool


class NucleiOutputs(Protocol):
    """What the writer needs of a run's outputs (`ImageOutputs`, `SlideOutputs`)."""

    label_maps: bool  # whether each tile's label map is handed over with its nuclei

    def start(self, data: Mapping[Hashable, object]) -> TileJob | None: ...

    def given_up(self, key: Hashable) -> bool: ...

    def add(self, job: TileJob, nuclei: TileNuclei) -> None: ...

    def tile_failed(self, job: TileJob, error: BaseException) -> None: ...

    def finish_run(self) -> None: ...


def _numpy(pred: object) -> np.ndarray:
    tensor = pred.as_tensor() if isinstance(pred, MetaTensor) else torch.as_tensor(pred)
    return tensor.detach().cpu().numpy()


class NucleiWriterd(MapTransform):
    """Post-process one tile and hand its nuclei to the run's outputs (see the module docstring).

    Args:
        nuclei: the post-processing of a tile (`@tile_nuclei`).
        outputs: the run's outputs (`@outputs`).
    """

    def __init__(self, nuclei: TileNucleiPool, outputs: NucleiOutputs, pred_key: str = "pred") -> None:
        super().__init__(keys=pred_key)
        self.nuclei, self.outputs, self.pred_key = nuclei, outputs, pred_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        job = self.outputs.start(d)
        if job is None:  # its source failed already
            return d
        try:
            self.nuclei.submit(job, _numpy(d.pop(self.pred_key)), label_map=self.outputs.label_maps)
        except Exception as err:  # noqa: BLE001 - a pool that cannot take the tile fails its source only
            self.outputs.tile_failed(job, err)
        self.write_finished()
        return d

    def write_finished(self, everything: bool = False) -> None:
        """Hand the tiles the pool has finished to the outputs, in submission order."""
        for job, result in self.nuclei.finished(everything):
            if self.outputs.given_up(job.key):
                continue
            error = result.exception()
            if error is None:
                try:
                    self.outputs.add(job, result.result())
                    continue
                except Exception as err:  # noqa: BLE001 - a write that fails (a full disk) fails its source only
                    error = err
            self.outputs.tile_failed(job, error)

    def complete(self) -> None:
        """After the evaluator (which fires no COMPLETED event for an empty data loader): hand over what the pool
        still holds, then let the outputs finish the run."""
        self.write_finished(everything=True)
        self.nuclei.close()
        self.outputs.finish_run()
