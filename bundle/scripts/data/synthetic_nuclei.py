"""The one generator of synthetic nucleus maps for tests and benchmarks: ground-truth-like instance and type maps,
and prediction-like copies of them.

The demo dataset (`pannuke/demo_data.py`) renders H&E-looking tiles around nuclei of its own; what is built here
is maps only, where a test or a benchmark needs known nuclei of a chosen kind:

- `synthetic_nuclei`: ellipses, either touching (each pixel goes to the nearest centre whose ellipse covers it, so
  neighbours share an edge and every nucleus stays convex and whole) or overlapping (painted in order, a later
  nucleus covering an earlier one, which can leave the earlier one in pieces, as PanNuke's masks do); centres
  spread evenly or in clusters.
- `random_types`: a type per nucleus.
- `prediction_like`: a model-like prediction of a map: nuclei shifted by a pixel or two, some missed, some given
  another type, one false positive, and non-contiguous ids.
"""

from __future__ import annotations

import numpy as np
from skimage.draw import ellipse

from scripts.data.pannuke.format import NUM_TYPES


def synthetic_nuclei(
    rng: np.random.Generator,
    count: int,
    size: int = 96,
    radii: tuple[float, float] = (5.0, 9.0),
    min_distance: float = 9.0,
    margin: float = 10.0,
    cluster_spread: float = 0.0,
    touching: bool = True,
) -> np.ndarray:
    """(size, size) int32 instance map with ids 1..count (an id may be covered entirely where `touching` is False).

    Args:
        count: nuclei to place.
        radii: range of each ellipse's two semi-axes, in pixels.
        min_distance: centres at least this far apart (9 px with radii up to 9 leaves every touching nucleus an
            interior); 0 lets them fall anywhere.
        margin: centres at least this far from the edge (clusters: their centres; members at half of it).
        cluster_spread: 0 spreads the centres evenly; otherwise groups of 1-6 around a cluster centre, this many
            pixels apart (standard deviation), so that many nuclei touch, as in dense tissue.
        touching: cut the ellipses along the bisectors of their centres (True) or paint them over one another.
    """
    centres: list[np.ndarray] = []
    while len(centres) < count:
        if cluster_spread:
            cluster = rng.uniform(margin, size - margin, 2)
            members = int(rng.integers(1, 7))
            candidates = (
                np.clip(cluster + rng.normal(0, cluster_spread, 2), margin / 2, size - margin / 2)
                for _ in range(members)
            )
        else:
            candidates = iter([rng.uniform(margin, size - margin, 2)])
        for centre in candidates:
            if len(centres) < count and all(np.hypot(*(c - centre)) >= min_distance for c in centres):
                centres.append(centre)
    inst = np.zeros((size, size), dtype=np.int32)
    if touching and centres:
        rows, cols = np.mgrid[:size, :size]
        nearest = np.argmin([np.hypot(rows - r, cols - c) for r, c in centres], axis=0) + 1
    for i, (r, c) in enumerate(centres, start=1):
        semi_axes = rng.uniform(*radii), rng.uniform(*radii)
        rr, cc = ellipse(r, c, *semi_axes, shape=inst.shape, rotation=rng.uniform(0, np.pi))
        if touching:
            mine = nearest[rr, cc] == i
            rr, cc = rr[mine], cc[mine]
        inst[rr, cc] = i
    return inst


def random_types(rng: np.random.Generator, inst: np.ndarray, num_types: int = NUM_TYPES) -> np.ndarray:
    """(H, W) uint8 type map: each nucleus of `inst` one type 1..num_types, 0 on the background."""
    per_id = rng.integers(1, num_types + 1, int(inst.max()) + 1).astype(np.uint8)
    per_id[0] = 0
    return per_id[inst]


def prediction_like(
    rng: np.random.Generator,
    inst: np.ndarray,
    types: np.ndarray,
    missed: float = 0.15,
    retyped: float = 0.2,
    num_types: int = NUM_TYPES,
) -> tuple[np.ndarray, np.ndarray]:
    """(instance map, type map) a model might predict for `inst`/`types`: each nucleus shifted by up to 2 px, a
    fraction `missed` left out, a fraction `retyped` given a random type, one false positive in the middle; ids
    3 id + 1 and 99,999, not contiguous, as some post-processing leaves them."""
    pred, ptypes = np.zeros(inst.shape, np.int32), np.zeros(inst.shape, np.uint8)
    for inst_id in np.unique(inst)[1:]:
        if rng.random() < missed:
            continue
        dy, dx = rng.integers(-2, 3, size=2)
        rr, cc = np.nonzero(inst == inst_id)
        rr, cc = np.clip(rr + dy, 0, inst.shape[0] - 1), np.clip(cc + dx, 0, inst.shape[1] - 1)
        t = types[inst == inst_id][0] if rng.random() < 1 - retyped else rng.integers(1, num_types + 1)
        pred[rr, cc], ptypes[rr, cc] = inst_id * 3 + 1, t
    rr, cc = ellipse(inst.shape[0] // 2, inst.shape[1] // 2, 3, 4, shape=inst.shape)
    pred[rr, cc], ptypes[rr, cc] = 99_999, rng.integers(1, num_types + 1)
    return pred, ptypes
