"""The demo-model training scripts and the packages they wrote stay in step: no training, no inference."""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path

import pytest
import tomli_w

from node.runtime.package import MANIFEST, sha256_of
from training import DEMO_MODELS

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(DEMO_MODELS))
def test_script_manifest_is_the_committed_one(name: str) -> None:
    """An edit to a script's constants (target layer, codes, options) that was not written to its
    package, or a package edited by hand, fails here."""
    package = REPO / "models" / name
    committed = tomllib.loads((package / MANIFEST).read_text(encoding="utf-8"))
    manifest = importlib.import_module(DEMO_MODELS[name]).manifest()
    weights = committed["weights"]
    expected = {**manifest, "weights": weights, "sha256": sha256_of(package / weights)}
    assert tomllib.loads(tomli_w.dumps(expected)) == committed
