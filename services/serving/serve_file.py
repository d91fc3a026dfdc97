"""deploy.yaml, the Serve config file that `rayrag serve`, `serve run`, the benchmark and the tests share."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from cluster.config import describe

if TYPE_CHECKING:
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

IMPORT_PATH = "services.serving.app:build_app"
PACKAGED = Path(__file__).resolve().parent / "deploy.yaml"  # package data; the repository's top-level link
LOCAL_HTTP = {"host": "127.0.0.1", "port": 8000}  # where rayrag listens unless the file says otherwise


@dataclass(frozen=True)
class ServeFile:
    """A Serve config file, validated by Serve's own schema, that holds one rayrag application."""

    schema: ServeDeploySchema

    @property
    def app(self) -> ServeApplicationSchema:
        return self.schema.applications[0]

    @property
    def app_args(self) -> dict[str, Any]:
        """A copy of the application's `args:` (what `build_app` receives), free to change."""
        return copy.deepcopy(self.app.args)

    @property
    def http_options(self) -> dict[str, Any]:
        """The file's `http_options` over 127.0.0.1:8000, for `serve.start`."""
        return {**LOCAL_HTTP, **self.schema.http_options.model_dump(exclude_unset=True)}

    @property
    def controller_options(self) -> dict[str, Any]:
        """The file's `controller_options`, for `serve.start` (empty when it sets none)."""
        return self.schema.controller_options.model_dump(exclude_unset=True)


def default_config_path() -> str:
    """./deploy.yaml when present, else the one packaged with rayrag (`PACKAGED`)."""
    local = Path("deploy.yaml")
    return str(local if local.is_file() else PACKAGED)


def read_serve_file(path: str | None = None) -> ServeFile:
    """Parse `path` (default: `default_config_path()`); it must hold one rayrag application."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    path = path or default_config_path()
    with open(path, encoding="utf-8") as file:
        raw = yaml.safe_load(file) or {}
    try:
        schema = ServeDeploySchema.model_validate(raw)
    except ValidationError as error:
        raise ValueError(f"{path}: {describe(error)}") from error
    apps = schema.applications
    if len(apps) != 1 or apps[0].import_path != IMPORT_PATH:
        raise ValueError(f"{path}: expected one application with import_path {IMPORT_PATH}")
    return ServeFile(schema)
