"""The tiles of every planned slide as a MONAI dataset: DataLoader workers read them in the background.

Each item is one tile's window (core + margin, inside the slide) in model pixels; a window that cannot be read
becomes an error record for its slide instead of an exception.  Each worker opens every slide once, lazily, with the
reader that planned it (and that reader alone).  `WindowBatches` batches consecutive tiles whose windows have one size
(a slide narrower than a window has narrower ones).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
from monai.data import Dataset
from monai.transforms import apply_transform
from torch.utils.data import Sampler

from scripts.data.images import WHITE
from scripts.core.memory import trim_heap
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
        error = ""
        try:
            image = self._slide(slide_index).read(x, y, w, h)
        except Exception as err:  # noqa: BLE001 - a corrupt region fails its slide, never the run
            image = np.full((h, w, 3), WHITE, np.uint8)  # a stand-in of the window's size, so the batch still forms
            error = f"{self.sources[slide_index][0]}: tile at ({x}, {y}) cannot be read ({type(err).__name__}: {err})"
        item = {"image": image, "slide": slide_index, "tile": tile.index, "error": error}
        return apply_transform(self.transform, item) if self.transform is not None else item

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_open"] = {}  # slide handles are opened in each worker, never pickled
        return state


class WindowBatches(Sampler):
    """The tiles of `SlideTiles` in order, in batches of up to `batch_size`, a new batch wherever the window size
    changes (a DataLoader's `batch_sampler`: tensors of one batch must have one size).

    Args:
        dataset: the run's `SlideTiles` (`@dataset`).
        batch_size: tiles the network takes at once (`@tiles_per_batch`).
    """

    def __init__(self, dataset: SlideTiles, batch_size: int) -> None:
        self.sizes = [tile.window[2:] for _, tile in dataset.data]
        self.batch_size = int(batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        batch: list[int] = []
        for index, size in enumerate(self.sizes):
            if batch and (len(batch) == self.batch_size or size != self.sizes[batch[0]]):
                yield batch
                batch = []
            batch.append(index)
        if batch:
            yield batch

    def __len__(self) -> int:
        return sum(1 for _ in self)
