"""The in-process app over stand-ins, for the tests of the routes (see fakes.py)."""

from __future__ import annotations

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
