"""The tiles of every planned slide as a MONAI dataset: DataLoader workers read them in the background.

Each item is one tile's window (core + margin) in model pixels, padded with white where it runs off the slide so
that tiles batch together; a window that cannot be read becomes an error record for its slide instead of an
exception.  Each worker opens every slide once, lazily, with the reader that planned it (and that reader alone).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from monai.data import Dataset
from monai.transforms import apply_transform

from scripts.data.images import WHITE
from scripts.workflows.slides.memory import trim_heap
from scripts.workflows.slides.plan import SlidePlan
from scripts.workflows.slides.reader import Slide, open_slide


class SlideTiles(Dataset):
    """Args:
    planner: the run's `SlidePlanner` (`@slides`).
    transform: the preprocessing of inference.json (scale to 0-1, channel first).
    """

    def __init__(self, planner, transform: Callable | None = None) -> None:
        plans: list[SlidePlan] = planner.plans
        # plain values only: MONAI's worker seeding walks the dataset's attributes, and slide handles must stay out
        self.sources = [
            (str(p.path), p.mpp, p.slide.target_mpp if p.slide else 0.25, p.slide.backend if p.slide else None)
            for p in plans
        ]
        records = [(i, tile) for i, plan in enumerate(plans) for tile in plan.todo]
        self._open: dict[int, Slide] = {}
        super().__init__(data=records, transform=transform)

    def _slide(self, index: int) -> Slide:
        if index not in self._open:  # tiles come slide by slide: keep only the current slide open
            for other in self._open.values():
                other.close()
            self._open = {index: open_slide(*self.sources[index])}
        return self._open[index]

    def _transform(self, index: int) -> dict:
        trim_heap()  # the previous tile's reads and resampling are freed by now: hand their pages back
        slide_index, tile = self.data[index]
        x, y, w, h = tile.window
        image = np.full((h, w, 3), WHITE, np.uint8)
        error = ""
        try:
            slide = self._slide(slide_index)
            mw, mh = slide.model_size
            x0, y0, x1, y1 = max(0, x), max(0, y), min(mw, x + w), min(mh, y + h)
            if x1 > x0 and y1 > y0:
                image[y0 - y : y1 - y, x0 - x : x1 - x] = slide.read(x0, y0, x1 - x0, y1 - y0)
        except Exception as err:  # noqa: BLE001 - a corrupt region fails its slide, never the run
            error = f"{self.sources[slide_index][0]}: tile at ({x}, {y}) cannot be read ({type(err).__name__}: {err})"
        item = {"image": image, "slide": slide_index, "tile": tile.index, "error": error}
        return apply_transform(self.transform, item) if self.transform is not None else item

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_open"] = {}  # slide handles are opened in each worker, never pickled
        return state
