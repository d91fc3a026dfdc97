"""The OpenAPI document, fuzzed by schemathesis against the real routes over stand-in deployments:
no 5xx, no status the document does not list, responses as documented."""

from __future__ import annotations

from collections import Counter

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance
from schemathesis.config import SchemathesisConfig
from schemathesis.config._checks import (
    NEGATIVE_DATA_REJECTION_EXPECTED_STATUSES,
    POSITIVE_DATA_ACCEPTANCE_EXPECTED_STATUSES,
)

from services.serving.api import MAX_N_DOCS, MAX_NEW_TOKENS, MAX_NUM_BEAMS
from services.serving.config import LimitsConfig
from tests.services.serving.fakes import TOKEN, api_over, fake_backend

EXAMPLES_PER_OPERATION = 40  # per generation mode (valid and invalid data), per operation
# The work limit (n_docs × num_beams × max_new_tokens) spans three fields, which a JSON schema cannot
# say; at the fields' maxima every schema-valid request is within it (its 422: test_ingress.py).
NO_WORK_LIMIT = LimitsConfig(max_request_work=MAX_N_DOCS * MAX_NUM_BEAMS * MAX_NEW_TOKENS)
# Nor can it say that the last user message of a chat has text: a schema-valid chat may get a 422.
LOOSE_SCHEMA = {"POST /v1/chat/completions": [positive_data_acceptance]}
# Nor the body limit: a generated body over 64 KiB, valid or not, gets the documented 413.
CHECKS = SchemathesisConfig.from_dict(
    {
        "checks": {
            name: {"expected-statuses": [*defaults, "413"]}
            for name, defaults in (
                ("positive_data_acceptance", POSITIVE_DATA_ACCEPTANCE_EXPECTED_STATUSES),
                ("negative_data_rejection", NEGATIVE_DATA_REJECTION_EXPECTED_STATUSES),
            )
        }
    }
)


def test_fuzzed_requests_get_documented_statuses_and_never_5xx():
    schema = schemathesis.openapi.from_asgi(
        "/openapi.json", api_over(fake_backend(), limits=NO_WORK_LIMIT), config=CHECKS
    )
    calls: Counter[str] = Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        modes = (
            (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
            if operation.body
            else (GenerationMode.POSITIVE,)
        )
        for mode in modes:

            @settings(
                max_examples=EXAMPLES_PER_OPERATION,
                derandomize=True,
                database=None,
                deadline=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def call(case) -> None:
                case.call_and_validate(
                    headers={"authorization": f"Bearer {TOKEN}"},
                    excluded_checks=LOOSE_SCHEMA.get(case.operation.label, []),
                )
                calls[case.operation.label] += 1

            call()
    assert sum(calls.values()) >= 300, calls
