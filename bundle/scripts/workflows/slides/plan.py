"""Plan each slide of a run: open it, find its tissue, lay the tile grid over it, and see what an earlier run finished.

The grid lives in model pixels (0.25 µm/px).  Every tile has a core (`tile_size` square; the cores tile the slide
without overlap) and a window (the core plus `margin` on each side) that the network sees.  A nucleus is kept only by
the tile whose core holds its centroid, so a nucleus cut by a tile edge comes out once, whole, from the tile that sees
all of it (margins are wider than a nucleus).  Tiles whose core has no tissue in the low-resolution mask are never read.

Windows are laid as tile inference lays them on an image (`scripts/model/tiled.py`): never past the slide's edge,
shifted inwards there, the slide's whole width where it is narrower than a window; each goes through the network
whole.  So a field saved as an image and the same pixels as a slide reach the network identically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch.distributed as dist
from PIL import Image, ImageDraw

from scripts.core.flags import as_bool
from scripts.core.distributed import is_distributed
from scripts.core.errors import ConfigError, DataError
from scripts.model.tiled import Tile, check_tiles, tile_spans
from scripts.workflows.predict.nucleus_record import CSV_HEADER
from scripts.core.atomic import atomic_write, require_inside, require_writable
from scripts.workflows.slides.progress import SlideProgress
from scripts.workflows.slides.reader import Slide, find_slides, open_slide, slide_name
from scripts.workflows.slides.tissue import mask_from_file, tissue_mask

logger = logging.getLogger(__name__)


@dataclass
class SlidePlan:
    """One slide of the run: where its outputs go, its tiles, and those still to do."""

    name: str
    path: Path
    folder: Path
    mpp: float
    tiles: list[Tile] = field(default_factory=list)
    todo: list[Tile] = field(default_factory=list)
    tissue_mm2: float = 0.0
    error: str = ""
    slide: Slide | None = None
    number: int = 0  # the slide's place in the run, which offsets how its tiles are shared out across ranks

    @property
    def done(self) -> bool:
        return not self.error and not self.todo


def rank_share() -> tuple[int, int, str]:
    """(rank, world size, progress-file suffix): under torchrun every rank takes every world_size-th tile of each
    slide (one large slide is shared out as well as a folder of them); alone, a process takes them all."""
    if not is_distributed() or dist.get_world_size() == 1:
        return 0, 1, ""
    rank, world = dist.get_rank(), dist.get_world_size()
    return rank, world, f".rank{rank}of{world}"


def tile_grid(
    mask: np.ndarray, model_px_per_mask_px: float, size: tuple[int, int], tile: int, margin: int
) -> list[Tile]:
    """Tiles whose core overlaps tissue, in row-major order: the cores and windows tile inference uses for an image
    of the slide's size (`tile_spans`), so neighbouring cores whose windows coincide are one tile."""
    width, height = size
    tiles = []
    for y, h, wy, wh in tile_spans(height, tile, margin):
        for x, w, wx, ww in tile_spans(width, tile, margin):
            r0, c0 = int(y / model_px_per_mask_px), int(x / model_px_per_mask_px)
            r1 = max(r0 + 1, int(np.ceil((y + h) / model_px_per_mask_px)))
            c1 = max(c0 + 1, int(np.ceil((x + w) / model_px_per_mask_px)))
            if mask[r0:r1, c0:c1].any():
                tiles.append(Tile(len(tiles), (x, y, w, h), (wx, wy, ww, wh)))
    return tiles


class SlidePlanner:
    """Plans for every slide of `input_dir`; a slide that cannot be read is planned as failed, the others go on.

    Args:
        input_dir: a slide, or a folder of slides.
        output_dir: one folder per slide goes here.
        mpp: µm/px of level 0 for slides without that metadata (None: read it from each slide).
        target_mpp: the model's scale.
        tile_size: core size of a tile in model pixels.
        margin: context around each core, in model pixels (wider than a nucleus).
        mask_dir: optional folder of tissue masks named like the slides (`<stem>.png`).
        overwrite: redo slides that are already finished.
    """

    def __init__(
        self,
        input_dir: str | os.PathLike,
        output_dir: str | os.PathLike,
        mpp: float | None = None,
        target_mpp: float = 0.25,
        tile_size: int = 1024,
        margin: int = 64,
        mask_dir: str | os.PathLike | None = None,
        overwrite: bool = False,
    ) -> None:
        check_tiles(tile_size, margin)
        self.tile_size, self.margin = int(tile_size), int(margin)
        if mask_dir and not Path(mask_dir).is_dir():
            raise ConfigError(
                f"--tissue_mask_dir {mask_dir} is not a folder: pass the folder holding <slide>.png masks, or leave "
                "it unset to find tissue on each slide's thumbnail"
            )
        self.output_dir = require_writable(output_dir, "output_dir")
        overwrite = as_bool(overwrite, "overwrite")
        mpp = None if mpp in (None, "", 0, "null", "None") else float(mpp)
        self.plans: list[SlidePlan] = []
        names: dict[str, Path] = {}
        for number, path in enumerate(find_slides(input_dir)):
            name = slide_name(path)
            plan = SlidePlan(name, path, self.output_dir / name, float(mpp or 0))
            try:
                if name in names:
                    raise DataError(f"{path}: same name as {names[name]}, so their outputs would mix; rename one")
                require_inside(self.output_dir, plan.folder, DataError)
                names[name] = path
                self._plan(plan, number, mpp, target_mpp, mask_dir, overwrite)
            except Exception as err:  # noqa: BLE001 - one unreadable slide never stops the others
                message = (
                    str(err) if isinstance(err, DataError) else f"{path}: cannot be read ({type(err).__name__}: {err})"
                )
                plan.error, plan.todo = message, []
                if plan.slide is not None:
                    plan.slide.close()
                    plan.slide = None
                logger.error(f"{path.name}: FAILED, {message}")
            self.plans.append(plan)

    def _plan(self, plan: SlidePlan, number: int, mpp, target_mpp: float, mask_dir, overwrite: bool) -> None:
        rank, world, part = rank_share()
        progress = SlideProgress(plan.folder, plan.name, part)
        for path in progress.files():  # appending, cutting or reading through a link would reach outside
            require_inside(self.output_dir, path, DataError)
        if progress.finished() and not overwrite:
            logger.info(f"{plan.name}: finished earlier in {plan.folder}, skipped (--overwrite true redoes it)")
            return
        slide = open_slide(plan.path, mpp, float(target_mpp))
        plan.slide, plan.mpp = slide, slide.mpp
        logger.info(slide.describe())
        thumb, factor = slide.thumbnail()
        mask_path = Path(mask_dir) / f"{plan.name}.png" if mask_dir else None
        if mask_path and mask_path.is_file():
            mask = mask_from_file(mask_path, thumb.shape[:2])
        else:
            if mask_path:
                logger.warning(f"{plan.name}: no tissue mask {mask_path}; finding tissue on the thumbnail instead")
            mask = tissue_mask(thumb)
        plan.tissue_mm2 = float(mask.sum()) * (factor * target_mpp / 1000.0) ** 2
        plan.tiles = tile_grid(mask, factor, slide.model_size, self.tile_size, self.margin)
        grid = {"tile_size": self.tile_size, "margin": self.margin, "mpp": slide.mpp, "model_mpp": slide.target_mpp}
        grid["columns"] = CSV_HEADER.strip()  # progress written with other CSV columns is redone, not appended to
        # cores and windows: progress written with other windows (an earlier version) is redone, not appended to
        tiles = [(t.core, t.window) for t in plan.tiles]
        grid["tiles"] = hashlib.sha256(json.dumps(tiles).encode()).hexdigest()[:16]
        if overwrite or not progress.same_grid(grid):
            progress.reset()
        progress.write_grid(grid)
        done = progress.resume()
        # the slide's number offsets the share, so a folder of 1-tile slides does not all land on rank 0
        plan.todo = [t for t in plan.tiles if (t.index + number) % world == rank and t.index not in done]
        plan.number = number
        if rank == 0:
            _write_tissue_png(plan.folder / f"{plan.name}_tissue.png", thumb, mask, plan.tiles, factor)
        slide.close()  # reopened when needed: a folder of a thousand slides must not hold a thousand files open
        logger.info(
            f"{plan.name}: {plan.tissue_mm2:.1f} mm² of tissue, {len(plan.tiles)} tiles of {self.tile_size} px, "
            f"{len(plan.todo)} to do" + (f" on rank {rank} of {world}" if world > 1 else "")
        )


def _write_tissue_png(path: Path, thumb: np.ndarray, mask: np.ndarray, tiles: list[Tile], factor: float) -> None:
    """The thumbnail with glass dimmed and every processed tile's core outlined: what the run looked at."""
    shown = np.where(mask[..., None], thumb, (thumb * 0.4 + 153).astype(np.uint8))
    picture = Image.fromarray(shown)
    draw = ImageDraw.Draw(picture)
    for t in tiles:
        x, y, w, h = (v / factor for v in t.core)
        draw.rectangle([x, y, x + w, y + h], outline=(0, 160, 255))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))
