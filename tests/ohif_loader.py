"""Open a DICOM SR or SEG the way OHIF Viewers 3.13 does, so a test can assert that a radiologist's
viewer shows what the node writes.

``tests/ohif/load.mjs`` reads the files with dcmjs and hands them to ``@cornerstonejs/adapters`` at
the versions OHIF 3.13.13 pins (``tests/ohif/package-lock.json``), running OHIF's own SR and SEG
loading logic between them, quirks included. ``bash deploy/install.sh --test`` installs Node.js and
those packages (``npm ci --prefix tests/ohif``); without them the calling test is skipped, never
passed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict, cast

import pytest

HARNESS = Path(__file__).parent / "ohif"
# The ES-module syntax detection dcmjs 0.52's build relies on arrived in Node.js 20.19.
MINIMUM_NODE = (20, 19)


class Label(TypedDict):
    label: str
    value: str


class Measurement(TypedDict):
    trackingIdentifier: str | None
    trackingUniqueIdentifier: str | None
    labels: list[Label]
    graphicType: str | None  # the SCOORD's graphic type; None for a group OHIF found none in
    loaded: bool  # OHIF drew it on a loaded image (or, SCOORD3D, in its frame of reference)
    drawnOn: str | None  # SOP Instance UID of the image it is drawn on


class Viewport(TypedDict):
    opens: bool  # the SR viewport opens measurement 0's image; False leaves it empty
    image: str | None


class Hydration(TypedDict):
    rehydratable: bool  # OHIF offers to track the report's measurements
    error: str | None
    annotations: list[dict[str, Any]]  # what the adapters' generateToolState turned into annotations


class SRLoad(TypedDict):
    ok: bool
    error: str | None  # OHIF's exception, verbatim
    measurements: list[Measurement]
    viewport: Viewport | None
    hydration: Hydration | None
    warnings: list[str]  # what OHIF and the adapters warned on the console


class SegmentFrame(TypedDict):
    sopInstanceUID: str | None  # the source image the segment's pixels land on
    pixels: int


class Segment(TypedDict):
    number: int
    label: str | None
    frames: list[SegmentFrame]


class SEGLoad(TypedDict):
    ok: bool
    error: str | None
    segments: list[Segment]
    warnings: list[str]


def load_sr(sr: Path, sources: Sequence[Path]) -> SRLoad:
    """Load the Structured Report ``sr`` beside its source images as OHIF's SR viewport does."""
    return cast(SRLoad, _run("sr", sr, sources))


def load_seg(seg: Path, sources: Sequence[Path]) -> SEGLoad:
    """Load the Segmentation ``seg`` over its source images as OHIF's SEG viewport does."""
    return cast(SEGLoad, _run("seg", seg, sources))


def _run(kind: str, target: Path, sources: Sequence[Path]) -> Any:
    command = [_node(), str(HARNESS / "load.mjs"), kind, str(target), *(str(path) for path in sources)]
    done = subprocess.run(command, cwd=HARNESS, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the OHIF harness failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout)


def _node() -> str:
    """The node executable, once the pinned packages are known to be installed; else skip the test."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed (bash deploy/install.sh --test installs it)")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True).stdout
    found = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if found < MINIMUM_NODE:
        pytest.skip(f"Node.js {version.strip()} is older than 20.19, which OHIF 3.13's dcmjs needs")
    lock = json.loads((HARNESS / "package-lock.json").read_text())
    for name in lock["packages"][""]["dependencies"]:
        manifest = HARNESS / "node_modules" / name / "package.json"
        if not manifest.is_file():
            pytest.skip(f"{name} is not installed: run npm ci --prefix tests/ohif")
        installed = json.loads(manifest.read_text())["version"]
        pinned = lock["packages"][f"node_modules/{name}"]["version"]
        if installed != pinned:
            raise RuntimeError(
                f"{name} {installed} is installed, OHIF 3.13 pins {pinned}: run npm ci --prefix tests/ohif"
            )
    return node
