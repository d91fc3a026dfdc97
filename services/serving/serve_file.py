"""deploy.yaml, the Serve config file that `rayrag serve`, `serve run`, the benchmark and the tests share."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMPORT_PATH = "services.serving.app:build_app"


@dataclass
class ServeFile:
    """The parts of a Serve config file that rayrag reads: HTTP, controller options, its app."""

    http_options: dict[str, Any]
    controller_options: dict[str, Any]
    app: dict[str, Any]

    @property
    def app_args(self) -> dict[str, Any]:
        return dict(self.app.get("args") or {})


def default_config_path() -> str:
    """./deploy.yaml when present, else the one next to the installed packages."""
    local = Path("deploy.yaml")
    return str(local if local.is_file() else Path(__file__).resolve().parents[1] / "deploy.yaml")


def read_serve_file(path: str | None = None) -> ServeFile:
    """Parse `path` (default: `default_config_path()`); it must hold one rayrag application."""
    import yaml

    path = path or default_config_path()
    with open(path, encoding="utf-8") as file:
        config = yaml.safe_load(file) or {}
    apps = config.get("applications") or []
    if len(apps) != 1 or apps[0].get("import_path") != IMPORT_PATH:
        raise ValueError(f"{path}: expected one application with import_path {IMPORT_PATH}")
    http = {"host": "127.0.0.1", "port": 8000, **(config.get("http_options") or {})}
    return ServeFile(http, dict(config.get("controller_options") or {}), apps[0])
