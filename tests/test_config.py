from pathlib import Path

import pytest

from node.config import ConfigError, load_settings

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_example_config_is_valid() -> None:
    settings = load_settings(REPO / "config.example.toml", environ={})
    assert settings.node.ae_title == "AINODE"
    assert settings.routes[0].handler == "ct_hemorrhage"
    assert settings.node.models_dir == REPO / "models"


def test_unknown_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"node\.dicom_prot"):
        load_settings(write(tmp_path, "[node]\ndicom_prot = 104\n"), environ={})


def test_bad_value_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"node\.dicom_port"):
        load_settings(write(tmp_path, '[node]\ndicom_port = "many"\n'), environ={})
    with pytest.raises(ConfigError, match=r"node\.ae_title"):
        load_settings(write(tmp_path, '[node]\nae_title = "A_TITLE_LONGER_THAN_16"\n'), environ={})


def test_route_to_unknown_destination_is_named(tmp_path: Path) -> None:
    text = '[[routes]]\nname="r"\nhandler="ct_hemorrhage"\nmodel="m"\ndestinations=["nowhere"]\n'
    with pytest.raises(ConfigError, match=r"routes\.0\.destinations.*nowhere"):
        load_settings(write(tmp_path, text), environ={})


def test_environment_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[node]\ndicom_port = 104\n")
    env = {
        "AINODE_NODE__DICOM_PORT": "11113",
        "AINODE_NODE__ALLOWED_CALLING_AETS": '["PACS"]',
        "AINODE_STUDY__STABLE_SECONDS": "2.5",
        "AINODE_NODE__AE_TITLE": "NODE2",
    }
    settings = load_settings(path, environ=env)
    assert settings.node.dicom_port == 11113
    assert settings.node.allowed_calling_aets == ["PACS"]
    assert settings.study.stable_seconds == 2.5
    assert settings.node.ae_title == "NODE2"


def test_relative_paths_follow_the_file(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, '[node]\ndata_dir = "spool"\n'), environ={})
    assert settings.node.data_dir == tmp_path / "spool"
    assert settings.node.resolved_database_url == f"sqlite:///{tmp_path / 'spool' / 'ainode.db'}"
