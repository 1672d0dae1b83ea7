"""Constants of the PanNuke format and of this bundle's label map, shared by every module.

PanNuke masks have 6 channels: 5 nucleus-type instance maps and a binary background.  The network predicts one
label map per tile with 7 classes: background, the interior of each of the 5 types, and a nucleus boundary class
that lets post-processing split touching nuclei.
"""

from __future__ import annotations

from scripts.core.classes import PANNUKE_COLOURS, PANNUKE_NAMES

TILE_SIZE = 256
# PanNuke's own types; a lab's folds may carry others (scripts/core/classes.py)
TYPE_NAMES = PANNUKE_NAMES
NUM_TYPES = len(TYPE_NAMES)
TYPE_COLOURS = PANNUKE_COLOURS

# label-map classes the network is trained on
BACKGROUND = 0
# interior of type t (t = 1..5, PanNuke channel t-1) has class t
BOUNDARY = NUM_TYPES + 1
NUM_CLASSES = NUM_TYPES + 2
CLASS_NAMES: tuple[str, ...] = ("Background", *TYPE_NAMES, "Boundary")
# the "hv" target adds HoVer-Net's horizontal and vertical distance maps to a 6-class softmax (no boundary class)
HV_CHANNELS = 2
