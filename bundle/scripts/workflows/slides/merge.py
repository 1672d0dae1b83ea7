"""Under torchrun each rank writes its share of a slide's tiles into files of its own; once every rank is done, rank
0 puts each slide together in tile order, numbering nuclei as one process would, so the files are exactly a single
process's."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import torch.distributed as dist

from scripts.workflows.predict.nucleus_record import csv_type_id, feature_text, renumber_feature
from scripts.workflows.slides.progress import SlideProgress

if TYPE_CHECKING:  # the outputs call merge_ranks
    from scripts.workflows.slides.outputs import SlideOutputs


def merge_ranks(outputs: SlideOutputs) -> None:
    """Share the ranks' failures, then (on rank 0) merge every slide no rank failed; all ranks wait for the end."""
    for progress in outputs.progress.values():
        progress.close()
    errors: list[dict[int, str]] = [{}] * outputs.world
    dist.all_gather_object(errors, {i: p.error for i, p in enumerate(outputs.plans) if p.error})
    for found in errors:
        for index, error in found.items():
            outputs.plans[index].error = outputs.plans[index].error or error
    if outputs.rank == 0:
        for index in outputs.progress:
            if not outputs.plans[index].error:
                merge_slide(outputs, index)
    dist.barrier()


def merge_slide(outputs: SlideOutputs, index: int) -> None:
    """One slide's rank files -> its single-process files, then its summary and overlay."""
    plan, world = outputs.plans[index], outputs.world
    parts = [SlideProgress(plan.folder, plan.name, f".rank{r}of{world}") for r in range(world)]
    ranges = [part.tile_ranges() for part in parts]
    whole = SlideProgress(plan.folder, plan.name)
    whole.reset()
    files = [
        (open(p.partial["geojson"], "rb"), open(p.partial["csv"], "rb")) if ranges[r] else (None, None)
        for r, p in enumerate(parts)
    ]
    try:
        for tile in plan.tiles:
            r = (tile.index + plan.number) % world
            g0, g1, c0, c1 = ranges[r][tile.index]
            geojson, csv_file = files[r]
            geojson.seek(g0)
            text = geojson.read(g1 - g0).decode("utf-8").removeprefix(",\n")
            csv_file.seek(c0)
            lines = csv_file.read(c1 - c0).decode("utf-8").splitlines(keepends=True)
            features, rows, types = [], [], []
            for n, (feature, row) in enumerate(zip(json.loads(f"[{text}]"), lines, strict=True)):
                nucleus_id = whole.nuclei + n + 1
                features.append(feature_text(renumber_feature(feature, nucleus_id)))
                rows.append(str(nucleus_id) + row[row.index(",") :])
                types.append(csv_type_id(row))
            whole.add_tile(tile.index, features, rows, types)
    finally:
        for pair in files:
            for f in pair:
                if f is not None:
                    f.close()
    outputs.progress[index] = whole
    outputs.finish(index)
    for part in parts:
        part.remove()
