"""The encoder pool: its size from the cluster's CPUs, the message while it waits for CPUs,
and encoding with the actors that could start."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest

from cluster import encode_pool
from cluster.encode_pool import EncoderPlan, encode_on_ray, plan_encoders, waiting_message
from cluster.encoders import TextEncoder
from tests.tiny_models import save_tiny_encoder

TEXTS = [" ".join(["river", "castle", "planet", "violin"][: 1 + i % 4] * (1 + i % 7)) for i in range(40)]


@pytest.fixture(scope="module")
def encoder_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_encoder(tmp_path_factory.mktemp("enc") / "tiny", dim=32)


@pytest.mark.parametrize(
    ("free", "tasks", "given", "plan"),
    [
        (2, 100, {}, EncoderPlan(2, 1, 1.0)),  # one single-threaded actor per free CPU
        (16.5, 100, {}, EncoderPlan(16, 1, 1.0)),
        (16, 3, {}, EncoderPlan(3, 5, 5.0)),  # no more actors than tasks; threads fill the CPUs
        (16, 100, {"actors": 4}, EncoderPlan(4, 4, 4.0)),
        (16, 100, {"threads": 8}, EncoderPlan(2, 8, 8.0)),
        (16, 100, {"actors": 2, "cpus": 0.5}, EncoderPlan(2, 8, 0.5)),  # fractional reservations
        (2, 100, {"actors": 3}, EncoderPlan(3, 1, 1.0)),
        (0.5, 100, {}, EncoderPlan(1, 1, 0.5)),  # less than one CPU free: one actor takes what is
        (0, 100, {}, EncoderPlan(1, 1, 1.0)),  # no CPU free: one actor waits for one
    ],
)
def test_plan_fills_the_free_cpus(free: float, tasks: int, given: dict, plan: EncoderPlan) -> None:
    assert plan_encoders(free, tasks, **given) == plan


@pytest.mark.parametrize(
    ("given", "named"),
    [({"actors": 0}, "encoders must be ≥ 1, got 0"), ({"threads": 0}, "threads must be ≥ 1, got 0")]
    + [({"cpus": -0.5}, "CPUs must be ≥ 0, got -0.5")],
)
def test_plan_rejects_bad_values(given: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        plan_encoders(8, 10, **given)


@pytest.mark.parametrize(
    ("plan", "free", "hint"),
    [
        (EncoderPlan(2, 1, 1.0), 1.0, "--encoder-cpus 0.5 (fractions are allowed) or fewer --encoders"),
        (EncoderPlan(3, 2, 2.0), 1.0, "--encoder-cpus 0.33 (fractions are allowed) or fewer --encoders"),
        (EncoderPlan(2, 1, 1.0), 0.0, "--encoder-cpus 0 (the encoders then share the busy CPUs)"),
        (EncoderPlan(1, 4, 4.0), 6.0, "a lower --encoder-cpus"),  # CPUs enough in all: no value to name
    ],
)
def test_waiting_message_names_a_setting_that_fits(plan: EncoderPlan, free: float, hint: str) -> None:
    message = waiting_message(plan, free, 8.0)
    assert message.startswith(
        f"waiting for CPUs: {plan.actors} encoder actor(s) asking for {plan.cpus:g} CPU"
    )
    assert f"Ray has {free:g} of 8 CPUs free. To start now, pass {hint}" in message


class _Stop(Exception):
    """Raised by the log handler below to end a wait that would otherwise last forever."""


class _StopOnSecondWarning(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        if len(self.messages) == 2:
            raise _Stop


def test_says_which_cpus_it_waits_for(
    ray_session, encoder_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(encode_pool, "WAIT_S", 0.2)
    monkeypatch.setattr(encode_pool, "REPEAT_S", 0.2)
    handler = _StopOnSecondWarning()
    logger = logging.getLogger(encode_pool.__name__)
    logger.addHandler(handler)
    total = ray_session.cluster_resources()["CPU"]
    try:
        with pytest.raises(_Stop):  # more CPUs per actor than the cluster has: never placed
            encode_on_ray(TEXTS, encoder_path, num_encoders=2, encoder_cpus=total + 1, show_progress=False)
    finally:
        logger.removeHandler(handler)
    first = handler.messages[0]
    assert first.startswith(f"waiting for CPUs: 2 encoder actor(s) asking for {total + 1:g} CPU each")
    assert re.search(
        rf"Ray has [0-9.]+ of {total:g} CPUs free. To start now, pass --encoder-cpus [0-9.]+ ", first
    )
    assert handler.messages[1] == first  # and it says so again while it waits


def test_encodes_with_the_actors_that_start(ray_session, encoder_path: str) -> None:
    half = 0.6 * ray_session.cluster_resources()["CPU"]  # two such actors never fit at once
    vectors, (name, dim, fingerprint) = encode_on_ray(
        TEXTS, encoder_path, num_encoders=2, encoder_cpus=half, batch_size=2, show_progress=False
    )
    local = TextEncoder.from_pretrained(encoder_path)
    assert (name, dim, fingerprint) == (encoder_path, 32, local.fingerprint())
    np.testing.assert_allclose(vectors, local.encode(TEXTS), atol=1e-5)  # in the order of TEXTS
