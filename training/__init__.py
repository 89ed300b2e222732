"""Demonstration models trained on synthetic phantoms, one script per task (``train_<task>.py``).

``ainode models train-demo TASK`` runs the script for TASK; each script's ``main(argv)`` takes
``--out`` (the package folder to write) and ``--measure-only`` (``common.arguments``) and is
reproducible from fixed seeds.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

# demo package name → the module that trains it
DEMO_MODELS = {
    "ct-hemorrhage": "training.train_ct_hemorrhage",
    "chest-xray": "training.train_chest_xray",
    "fundus": "training.train_fundus",
    "skin-lesion": "training.train_skin_lesion",
    "skin-lesion-segmentation": "training.train_skin_segmentation",
    "conjunctiva-anemia": "training.train_conjunctiva_anemia",
}


def train_demo(name: str, argv: Sequence[str]) -> None:
    """Train demo package ``name``; ``argv`` goes to its script (e.g. ``["--out", "models/fundus"]``)."""
    if name not in DEMO_MODELS:
        raise ValueError(f"no demo model {name!r}; there are {', '.join(DEMO_MODELS)}")
    importlib.import_module(DEMO_MODELS[name]).main(list(argv))
