"""Constants of the PanNuke format and of this bundle's label map, shared by every module.

PanNuke masks have 6 channels: 5 nucleus-type instance maps and a binary background.  The network predicts one
label map per tile with 7 classes: background, the interior of each of the 5 types, and a nucleus boundary class
that lets post-processing split touching nuclei.
"""

from __future__ import annotations

TILE_SIZE = 256
TYPE_NAMES: tuple[str, ...] = ("Neoplastic", "Inflammatory", "Connective", "Dead", "Epithelial")
NUM_TYPES = len(TYPE_NAMES)
# RGB colours per type, as used by the PanNuke paper figures; QuPath and the overlays use them too.
TYPE_COLOURS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0),  # Neoplastic: red
    (0, 255, 0),  # Inflammatory: green
    (0, 0, 255),  # Connective: blue
    (255, 255, 0),  # Dead: yellow
    (255, 165, 0),  # Epithelial: orange
)

# label-map classes the network is trained on
BACKGROUND = 0
# interior of type t (t = 1..5, PanNuke channel t-1) has class t
BOUNDARY = NUM_TYPES + 1
NUM_CLASSES = NUM_TYPES + 2
CLASS_NAMES: tuple[str, ...] = ("Background", *TYPE_NAMES, "Boundary")
# the "hv" target adds HoVer-Net's horizontal and vertical distance maps to a 6-class softmax (no boundary class)
HV_CHANNELS = 2
