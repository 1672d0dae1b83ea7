"""Under torchrun each rank writes its share of a slide's tiles into files of its own; once every rank is done, rank
0 puts each slide together in tile order, numbering nuclei as one process would, so the files are exactly a single
process's."""

from __future__ import annotations

import json
from collections.abc import Callable

import torch.distributed as dist

from scripts.workflows.predict.nucleus_record import csv_type_id, feature_text, renumber_feature
from scripts.workflows.slides.plan import SlidePlan
from scripts.workflows.slides.progress import SlideProgress


def merge_ranks(
    plans: list[SlidePlan], progress: dict[int, SlideProgress], rank: int, world: int, finish: Callable[[int], None]
) -> None:
    """Share the ranks' failures, then (on rank 0) merge every slide no rank failed into `progress` and `finish`
    it (its summary and overlay); all ranks wait for the end."""
    for part in progress.values():
        part.close()
    errors: list[dict[int, str]] = [{}] * world
    dist.all_gather_object(errors, {i: p.error for i, p in enumerate(plans) if p.error})
    for found in errors:
        for index, error in found.items():
            plans[index].error = plans[index].error or error
    if rank == 0:
        for index in progress:
            if not plans[index].error:
                progress[index] = merge_slide(plans[index], world)
                finish(index)
                for part in rank_parts(plans[index], world):  # only once the slide is finished
                    part.remove()
    dist.barrier()


def rank_parts(plan: SlidePlan, world: int) -> list[SlideProgress]:
    return [SlideProgress(plan.folder, plan.name, f".rank{r}of{world}") for r in range(world)]


def merge_slide(plan: SlidePlan, world: int) -> SlideProgress:
    """One slide's rank files -> its single-process files (still partial, for `finish` to publish)."""
    parts = rank_parts(plan, world)
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
    return whole
