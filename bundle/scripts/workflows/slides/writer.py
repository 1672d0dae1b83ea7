"""The last post transform of inference_wsi.json: hand each finished tile to the post-processing pool and its
nuclei to the slide's outputs.

The pieces, each with one job: `TileNucleiPool` (tile_nuclei.py) turns a tile's prediction into its nuclei, in this
process or in a pool; `SlideOutputs` (outputs.py) appends them to the slide's files and finishes a slide on its last
tile; `merge_ranks` (merge.py) puts the ranks' shares together under torchrun. `SlideNucleiWriterd` only connects
them: a tile the reader could not read, or whose post-processing failed, fails its slide, and the others go on.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from ignite.engine import Engine
from monai.data import MetaTensor
from monai.transforms import MapTransform

from scripts.workflows.slides.merge import merge_ranks
from scripts.workflows.slides.outputs import SlideOutputs
from scripts.workflows.predict.tile_nuclei import TileNucleiPool


class SlideNucleiWriterd(MapTransform):
    """Post-process one tile and write its nuclei into its slide's outputs (see the module docstring).

    Args:
        nuclei: the post-processing of a tile (`@tile_nuclei`).
        outputs: the slides' outputs (`@slide_outputs`).
    """

    def __init__(self, nuclei: TileNucleiPool, outputs: SlideOutputs, pred_key: str = "pred") -> None:
        super().__init__(keys=pred_key)
        self.nuclei, self.outputs, self.pred_key = nuclei, outputs, pred_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        index, tile_index = int(d["slide"]), int(d["tile"])
        plan = self.outputs.plans[index]
        if plan.error:
            return d
        if d.get("error"):
            self.outputs.fail(index, str(d["error"]))
            return d
        self.outputs.start(index)
        pred = d.pop(self.pred_key)
        pred = (pred.as_tensor() if isinstance(pred, MetaTensor) else torch.as_tensor(pred)).detach().cpu().numpy()
        self.nuclei.submit((index, tile_index), pred, plan.tiles[tile_index], plan.slide.scale, plan.slide.target_mpp)
        self.write_finished()
        return d

    def write_finished(self, everything: bool = False) -> None:
        """Write the tiles the pool has finished, in submission order."""
        for (index, tile_index), result in self.nuclei.finished(everything):
            plan = self.outputs.plans[index]
            if plan.error:
                continue
            error = result.exception()
            if error is not None:  # a worker's failure (or its death) fails its slide only
                self.outputs.fail(
                    index, f"{plan.path}: post-processing tile {tile_index} failed ({type(error).__name__}: {error})"
                )
                continue
            self.outputs.add(index, tile_index, *result.result())

    def attach(self, engine: Engine) -> None:
        """Nothing to attach: `complete` runs after the evaluator, even when this process had no tile to do (ignite
        fires no COMPLETED event for an empty data loader)."""

    def complete(self) -> None:
        """After the evaluator: write what the pool still holds, put ranks' shares together, log the summary."""
        self.write_finished(everything=True)
        self.nuclei.close()
        if self.outputs.world > 1:
            merge_ranks(self.outputs)
        self.outputs.summarise()
