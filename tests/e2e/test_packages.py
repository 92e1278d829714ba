"""Real Lambda code with real packages from PyPI, sandboxed: web frameworks behind their
Lambda adapters, AWS Lambda Powertools, boto3, and packages with compiled wheels.

The wheels come from a local cache the test setup fills from PyPI once per machine
(tests/support.py: pypi_wheels); each server installs from it offline, as a user's
``requirements.txt`` is installed: in the build sandbox, on the instances' own root.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.support import NimbusServer, pypi_wheels, running


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NimbusServer]:
    wheels = pypi_wheels()
    env = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels)}
    with running(tmp_path_factory.mktemp("packages") / "data", env=env) as server:
        server.client.timeout = 600  # a deploy installs its requirements
        yield server


def deployed(node: NimbusServer, fixture: str) -> None:
    r = node.deploy(fixture)
    assert r.status_code == 201, r.text


def test_fastapi_behind_mangum(node: NimbusServer) -> None:
    deployed(node, "pkg-fastapi")
    base = "/function/pkg-fastapi"
    r = node.client.get(f"{base}/items/42", params={"q": "blue"})
    assert r.status_code == 200 and r.json() == {"item_id": 42, "q": "blue"}
    r = node.client.post(f"{base}/orders", json={"item": "tea", "quantity": 2})
    assert r.status_code == 201 and r.json() == {"item": "tea", "quantity": 2, "total": 6}
    r = node.client.post(f"{base}/orders", json={"quantity": "lots"})
    assert r.status_code == 422  # pydantic's validation, as FastAPI answers it
    r = node.client.get(f"{base}/login")
    assert r.cookies.get("session") == "abc123"
    r = node.client.get(f"{base}/whoami", headers={"cookie": "session=xyz"})
    assert r.json() == {"session": "xyz"}
    r = node.client.get(f"{base}/pixel.png")
    assert r.headers["content-type"] == "image/png" and r.content.startswith(b"\x89PNG")
    # At the root of its own host, FastAPI's docs find their OpenAPI document.
    host = {"host": f"pkg-fastapi.localhost:{node.port}"}
    docs = node.client.get("/docs", headers=host)
    assert docs.status_code == 200 and "/openapi.json" in docs.text
    spec = node.client.get("/openapi.json", headers=host).json()
    assert spec["info"]["title"] == "orders"


def test_flask_behind_a_wsgi_adapter(node: NimbusServer) -> None:
    deployed(node, "pkg-flask")
    host = f"pkg-flask.localhost:{node.port}"
    r = node.client.get("/users/7", params={"sort": "name"}, headers={"host": host})
    assert r.status_code == 200, r.text
    assert r.json() == {
        "user_id": 7,
        "sort": "name",
        "url": f"http://{host}/users/7?sort=name",
        "link": "/users/8",
    }
    r = node.client.post(
        "/function/pkg-flask/echo", json={"a": [1, 2]}, headers={"user-agent": "tests"}
    )
    assert r.status_code == 202 and r.json() == {"got": {"a": [1, 2]}, "agent": "tests"}


def test_powertools(node: NimbusServer) -> None:
    deployed(node, "pkg-powertools")
    r = node.client.get("/function/pkg-powertools/pay/30")
    assert r.status_code == 200 and r.json() == {"paid": 30}, r.text
    rid = r.headers["x-nimbus-request-id"]
    records = node.wait_logs(
        "pkg-powertools",
        lambda rs: any(x["request_id"] == rid and x["message"].startswith("REPORT") for x in rs),
    )
    mine = [x["message"] for x in records if x["request_id"] == rid]
    # Logger: one JSON line, with the Lambda context it injected; never twice.
    paying = [json.loads(m) for m in mine if '"paying"' in m]
    assert len(paying) == 1, mine
    assert paying[0]["amount"] == 30 and paying[0]["service"] == "payments"
    assert paying[0]["function_request_id"] == rid and paying[0]["cold_start"] in (True, False)
    assert paying[0]["xray_trace_id"].startswith("1-")
    # Metrics: CloudWatch's embedded metric format, on stdout.
    emf = [json.loads(m) for m in mine if '"_aws"' in m]
    assert len(emf) == 1 and emf[0]["Payments"] == [1.0]
    assert emf[0]["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "Nimbus"
    # Tracer has a trace id in every invocation: no "still initializing" warning.
    assert not any("initializing" in m for m in mine), mine
    # Batch processing: an SQS batch with one bad record reports just that one.
    records = [
        {"messageId": f"m{i}", "receiptHandle": "h", "body": body, "attributes": {},
         "messageAttributes": {}, "md5OfBody": "", "eventSource": "aws:sqs",
         "eventSourceARN": "arn:aws:sqs:us-east-1:000000000000:q", "awsRegion": "us-east-1"}
        for i, body in enumerate(["ok", "bad", "ok"])
    ]  # fmt: skip
    r = node.invoke("pkg-powertools", {"Records": records})
    assert r.json() == {"batchItemFailures": [{"itemIdentifier": "m1"}]}, r.text


def test_boto3_clients_made_at_import(node: NimbusServer) -> None:
    deployed(node, "pkg-boto3")
    r = node.invoke("pkg-boto3")
    assert r.status_code == 200 and "x-nimbus-function-error" not in r.headers, r.text
    assert r.json() == {
        "region": "us-east-1",
        "s3": "us-east-1",
        "dynamodb": "us-east-1",
        "sqs_endpoint": "https://sqs.us-east-1.amazonaws.com",
        "arn_region": "us-east-1",
    }


def test_packages_with_compiled_wheels_import_and_work(node: NimbusServer) -> None:
    deployed(node, "pkg-compiled")
    r = node.invoke("pkg-compiled")
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["failures"] == {}, out["failures"]
    assert out["count"] >= 25
    results = out["results"]
    assert results["numpy"] == 1 and results["pandas"] == 6 and results["scipy"] == 3
    assert results["lxml"] == "7" and results["pillow"] == 4 and results["psycopg"] == "binary"
    assert results["sqlalchemy"] == 6 and results["matplotlib"] is True
