"""Which deploy.yaml `rayrag serve` reads: ./deploy.yaml, else the packaged one the repository links to."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.serving.serve_file import PACKAGED, default_config_path, read_serve_file

REPO = Path(__file__).resolve().parents[3]


def test_the_repository_deploy_yaml_is_the_packaged_file() -> None:
    assert (REPO / "deploy.yaml").resolve() == PACKAGED
    assert PACKAGED.is_relative_to(REPO / "services" / "serving")


def test_default_is_the_local_file_else_the_packaged_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert default_config_path() == str(PACKAGED)
    assert read_serve_file().app.name == "rayrag"
    local = tmp_path / "deploy.yaml"
    local.write_text(PACKAGED.read_text().replace("name: rayrag", "name: mine"))
    assert default_config_path() == "deploy.yaml"
    assert read_serve_file().app.name == "mine"
