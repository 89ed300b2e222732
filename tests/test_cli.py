"""The ``ainode`` commands as an admin runs them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import tomli_w

from tests.peers import REPO, OrthancServer, dciodvfy_errors, free_port
from training.chest_phantom import NORMAL, chest_dicom, sample
from training.ct_phantom import write_head_ct_series


def ainode(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, cwd=REPO, timeout=300
    )


def test_check_config_accepts_the_example() -> None:
    run = ainode("check-config", "--config", str(REPO / "config.example.toml"))
    assert run.returncode == 0, run.stderr
    assert "route head-ct: ct_hemorrhage with ct-hemorrhage" in run.stdout


def test_check_config_names_the_bad_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[study]\nstable_seconds = -1\n[[routes]]\nname="x"\nhandler="ct_hemorrhage"\nmodel="m"\n'
        'match = { Modalty = "CT" }\n'
    )
    run = ainode("check-config", "--config", str(bad))
    assert run.returncode == 2
    assert "study.stable_seconds" in run.stderr


def test_check_config_refuses_a_tampered_model(tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(REPO / "models" / "ct-hemorrhage", models / "ct-hemorrhage")
    with open(models / "ct-hemorrhage" / "weights.pt", "ab") as weights:
        weights.write(b"\0")
    config = tmp_path / "config.toml"
    config.write_bytes(
        tomli_w.dumps(
            {
                "node": {"models_dir": str(models)},
                "routes": [{"name": "head-ct", "handler": "ct_hemorrhage", "model": "ct-hemorrhage"}],
            }
        ).encode()
    )
    run = ainode("check-config", "--config", str(config))
    assert run.returncode == 2
    assert "sha256" in run.stderr


def test_echo_a_destination(tmp_path: Path) -> None:
    orthanc = OrthancServer(tmp_path / "orthanc").start()
    try:
        config = tmp_path / "config.toml"
        config.write_bytes(
            tomli_w.dumps(
                {
                    "destinations": [
                        {
                            "name": "pacs",
                            "ae_title": "ORTHANC",
                            "host": "127.0.0.1",
                            "port": orthanc.dicom_port,
                        },
                        {"name": "down", "ae_title": "NOBODY", "host": "127.0.0.1", "port": free_port()},
                    ]
                }
            ).encode()
        )
        ok = ainode("echo", "pacs", "--config", str(config))
        assert ok.returncode == 0 and "success" in ok.stdout
        down = ainode("echo", "down", "--config", str(config))
        assert down.returncode == 1 and "no association" in down.stdout
        unknown = ainode("echo", "nope", "--config", str(config))
        assert unknown.returncode == 2 and "no destination named 'nope'" in unknown.stderr
    finally:
        orthanc.stop()


@pytest.mark.parametrize("hemorrhage", [True, False])
def test_infer_offline_writes_valid_results(tmp_path: Path, hemorrhage: bool) -> None:
    write_head_ct_series(tmp_path / "ct", 20, hemorrhage=hemorrhage, seed=900 + hemorrhage)
    run = ainode(
        "infer",
        str(tmp_path / "ct"),
        "--out",
        str(tmp_path / "out"),
        "--config",
        str(REPO / "config.example.toml"),
    )
    assert run.returncode == 0, run.stderr
    assert ("suspected" if hemorrhage else "No intracranial hemorrhage") in run.stdout
    written = sorted((tmp_path / "out").rglob("*.dcm"))
    assert {p.name[:2] for p in written} == {"SC", "SR"}
    for path in written:
        assert dciodvfy_errors(path) == [], path.name
        assert (
            pydicom.dcmread(path).StudyInstanceUID
            == pydicom.dcmread(next((tmp_path / "ct").iterdir())).StudyInstanceUID
        )


def test_models_list_and_validate_the_bundled_model() -> None:
    listing = ainode("models", "list", "--config", str(REPO / "config.example.toml"))
    assert listing.returncode == 0 and "ct-hemorrhage" in listing.stdout and "1.0.0" in listing.stdout
    run = ainode("models", "validate", str(REPO / "models" / "ct-hemorrhage"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "ok   explain hemorrhage: Grad-CAM on layer4" in run.stdout and "ready to deploy" in run.stdout


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda text: text.replace('target_layer = "layer4"', 'target_layer = "layer9"'), "is not a layer"),
        (lambda text: text.replace("num_classes = 2", "num_classes = 3"), "load:"),
        (lambda text: text.replace('version = "1.0.0"', 'version = "one"'), "manifest: "),
        (
            lambda text: text.replace('handler = "ct_hemorrhage"', 'handler = "ct_unknown"'),
            "no handler named",
        ),
    ],
)
def test_models_validate_names_what_is_wrong(tmp_path: Path, edit: object, message: str) -> None:
    package = tmp_path / "ct-hemorrhage"
    shutil.copytree(REPO / "models" / "ct-hemorrhage", package)
    manifest = package / "manifest.toml"
    manifest.write_text(edit(manifest.read_text()))  # type: ignore[operator]
    run = ainode("models", "validate", str(package))
    assert run.returncode == 1, run.stdout + run.stderr
    assert "FAIL" in run.stdout and message in run.stdout


def chest_file(path: Path, view_position: str = "PA") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sample(np.random.default_rng(8), 320, NORMAL)
    chest_dicom(image, f"cli-chest-{view_position}", view_position=view_position).save_as(
        path, enforce_file_format=True
    )
    return path


def test_routes_test_names_the_route_taken_and_each_failed_condition(tmp_path: Path) -> None:
    ct = write_head_ct_series(tmp_path / "ct", 1, hemorrhage=False, seed=5, size=64)[0]
    lateral = chest_file(tmp_path / "lateral.dcm", "LL")
    run = ainode("routes", "test", str(ct), str(lateral), "--config", str(REPO / "config.example.toml"))
    assert run.returncode == 1, run.stderr  # a file that no route takes
    lines = run.stdout.splitlines()
    assert f"{ct}: takes head-ct" in lines
    assert "  chest-xray: Modality is 'CT', wanted ['CR', 'DX']; " in "\n".join(lines)
    assert f"{lateral}: no route" in lines
    assert "  chest-xray: ViewPosition is 'LL', wanted ['PA', 'AP', {'exists': False}]" in lines
    assert not any(line.startswith("  head-ct:") for line in lines[: lines.index(f"{lateral}: no route")])
    ok = ainode("routes", "test", str(ct), "--config", str(REPO / "config.example.toml"))
    assert ok.returncode == 0 and "takes head-ct" in ok.stdout


def test_infer_picks_the_model_by_the_routes_and_says_why_not(tmp_path: Path) -> None:
    frontal, lateral = chest_file(tmp_path / "in" / "pa.dcm"), chest_file(tmp_path / "in" / "ll.dcm", "LL")
    config = str(REPO / "config.example.toml")
    run = ainode("infer", str(frontal), str(lateral), "--out", str(tmp_path / "out"), "--config", config)
    assert run.returncode == 1, run.stderr  # the lateral film took no route
    assert "route chest-xray, series" in run.stdout and "chest-xray 1.0.0: " in run.stdout
    assert "no route matched" in run.stdout and "  chest-xray: ViewPosition is 'LL'" in run.stdout
    written = sorted((tmp_path / "out").rglob("*.dcm"))
    assert {p.name[:2] for p in written} == {"SC", "SR"} and {p.parent.name for p in written} == {
        "00-chest-xray"
    }
    for path in written:
        assert dciodvfy_errors(path) == [], path.name
    forced = ainode(
        "infer", str(lateral), "--route", "chest-xray", "--out", str(tmp_path / "forced"), "--config", config
    )
    assert forced.returncode == 0, forced.stderr
    assert (
        "route chest-xray" in forced.stdout and "view LL" in forced.stdout
    )  # the handler refuses it, not routing
    unknown = ainode(
        "infer", str(lateral), "--route", "chest", "--out", str(tmp_path / "x"), "--config", config
    )
    assert unknown.returncode == 2 and "no route named 'chest'" in unknown.stderr
