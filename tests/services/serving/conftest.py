"""The in-process app over stand-ins, for the tests of the routes (see fakes.py); one Serve instance on
127.0.0.1 for the tests of apps over real HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from tests.services.serving.fakes import api_over, fake_backend


@pytest.fixture
def backend() -> SimpleNamespace:
    return fake_backend()


@pytest.fixture
def client(backend, monkeypatch) -> TestClient:
    monkeypatch.delenv("RAYRAG_ADMIN_TOKEN", raising=False)
    with TestClient(api_over(backend)) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def serve_url(ray_session) -> Iterator[str]:
    """Serve started once (controller and HTTP proxy on a free 127.0.0.1 port, deploy.yaml's controller
    options); its URL. Each module deploys its own app at "/" and deletes it when done."""
    from ray import serve

    from tests.serve_load import start_serve

    yield start_serve()
    serve.shutdown()
