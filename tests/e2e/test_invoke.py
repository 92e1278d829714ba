"""Invoke end to end: a real server, real instance processes, real sockets."""

from __future__ import annotations

import base64
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.support import NimbusServer, instance_pids, processes_with


def test_deploy_invoke_over_http_and_api(server: NimbusServer) -> None:
    r = server.deploy("hello", name="inv-hello")
    assert r.status_code == 201, r.text
    assert r.json()["version"] == 1
    g = server.client.get("/function/inv-hello", params={"name": "ada"})
    assert g.status_code == 200, g.text
    assert g.json() == {"hello": "ada"}
    assert g.headers["content-type"] == "application/json"
    assert g.headers["x-nimbus-request-id"]
    r = server.invoke("inv-hello", {"queryStringParameters": {"name": "bob"}})
    assert r.status_code == 200 and r.json() == {"hello": "bob"}
    assert "x-nimbus-function-error" not in r.headers


def test_gateway_responses_are_sized_not_chunked(server: NimbusServer) -> None:
    assert server.deploy("hello", name="inv-sized").status_code == 201
    for path in ("/function/inv-sized", "/function/no-such-function"):
        r = server.client.get(path)
        assert r.headers.get("content-length") == str(len(r.content)), (path, r.headers)
        assert "transfer-encoding" not in r.headers, (path, r.headers)


def test_lambda_context_and_environment(server: NimbusServer) -> None:
    assert server.deploy("env-context", name="inv-env").status_code == 201
    out = server.invoke("inv-env").json()
    assert out["greeting"] == "hi"
    assert out["function_name"] == "inv-env"
    assert out["function_version"] == "1"
    assert out["memory"] == "256"
    assert out["arn"].endswith(":function:inv-env")
    assert out["log_group"] == "/aws/lambda/inv-env"
    assert 0 < out["remaining"] <= 7000
    assert out["handler"] == "app.handler"
    assert out["path0"] == out["task_root"]
    assert out["nimbus_importable"] is False  # the instance does not see Nimbus's environment
    assert not any(k.startswith("PIP_") for k in out["env_keys"])  # nor the server's variables


def test_http_event_and_full_response_mapping(server: NimbusServer) -> None:
    assert server.deploy("http-full", name="inv-http").status_code == 201
    r = server.client.get("/function/inv-http/png")
    assert r.status_code == 201
    assert r.headers["content-type"] == "image/png"
    assert r.headers["x-custom"] == "7"
    assert r.headers.get_list("set-cookie") == ["a=1; Path=/", "b=2"]
    assert r.content == b"\x89PNG\r\n\x1a\n\x00\xff"
    r = server.client.get("/function/inv-http/text")
    assert r.status_code == 200 and r.text == "plain words"
    r = server.client.post(
        "/function/inv-http/echo?x=1&x=2&y=",
        content=b"\x00\x01binary",
        headers={"content-type": "application/octet-stream", "x-test": "yes", "cookie": "c=3; d=4"},
    )
    body = r.json()
    assert body["method"] == "POST" and body["path"] == "/echo" and body["version"] == "2.0"
    assert body["query"] == {"x": "1,2", "y": ""}
    assert body["cookies"] == ["c=3", "d=4"]
    assert body["base64"] is True and body["body"] == b"\x00\x01binary".hex()
    assert body["header"] == "yes"
    r = server.client.put("/function/inv-http/echo", json={"k": "v"})
    assert r.json()["base64"] is False and json.loads(r.json()["body"]) == {"k": "v"}


def test_handler_exception_is_lambda_error_shape(server: NimbusServer) -> None:
    assert server.deploy("fails", name="inv-fails").status_code == 201
    r = server.invoke("inv-fails")
    assert r.status_code == 200
    assert r.headers["x-nimbus-function-error"] == "Unhandled"
    err = r.json()
    assert err["errorType"] == "PaymentDeclined"
    assert err["errorMessage"] == "card 4242 was declined"
    # Lambda's stack trace, of the function's own code: no frame of the runtime, no host path.
    assert len(err["stackTrace"]) == 1, err["stackTrace"]
    assert err["stackTrace"][0].startswith('  File "/var/task/app.py", line 6, in handler')
    assert "bootstrap" not in r.text and str(server.data_dir) not in r.text
    # Through the gateway, as a function URL answers: 502 and nothing of the error.
    g = server.client.get("/function/inv-fails")
    assert g.status_code == 502
    assert g.json() == {"message": "Internal Server Error"}
    assert g.headers["x-nimbus-function-error"] == "Unhandled"


def test_init_errors(server: NimbusServer) -> None:
    assert server.deploy("init-error", name="inv-initerr", force=True).status_code == 201
    r = server.invoke("inv-initerr")
    assert r.headers["x-nimbus-function-error"] == "Init"
    assert r.json()["errorType"] == "Runtime.ImportModuleError"
    assert "Unable to import module 'app'" in r.json()["errorMessage"]
    assert server.client.get("/function/inv-initerr").status_code == 502
    assert server.deploy("no-handler", name="inv-nohandler", force=True).status_code == 201
    r = server.invoke("inv-nohandler")
    assert r.json()["errorType"] == "Runtime.HandlerNotFound"
    assert r.json()["errorMessage"] == "Handler 'handler' missing on module 'app'"


def test_timeout_kills_process_group_and_next_call_works(server: NimbusServer) -> None:
    assert server.deploy("timeout", name="inv-timeout").status_code == 201
    r = server.invoke("inv-timeout", {"sleep": 30, "child": True})
    assert r.headers["x-nimbus-function-error"] == "Timeout"
    assert r.json()["errorMessage"] == "Task timed out after 1.00 seconds"
    rid = r.headers["x-nimbus-request-id"]
    records = server.wait_logs(
        "inv-timeout", lambda rs: any("Status: timeout" in x["message"] for x in rs)
    )
    assert any(x["message"] == f"child started nimbus-test-child-{rid}" for x in records)
    deadline = time.monotonic() + 5
    while processes_with(f"nimbus-test-child-{rid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not processes_with(f"nimbus-test-child-{rid}"), "the child survived the timeout"
    g = server.client.get("/function/inv-timeout", params={})
    assert g.status_code == 200
    r = server.client.post("/function/inv-timeout", json={})
    assert r.status_code == 200
    # The gateway maps a timeout to 504.
    r2 = server.client.post("/v1/functions/inv-timeout/invoke", json={"sleep": 5})
    assert r2.headers["x-nimbus-function-error"] == "Timeout"


def test_gateway_timeout_is_504(server: NimbusServer) -> None:
    assert server.deploy("timeout", name="inv-timeout504").status_code == 201
    r = server.client.get("/function/inv-timeout504", params={"sleep": 5})
    assert r.status_code == 504
    assert r.json() == {"message": "Endpoint request timed out"}
    assert r.headers["x-nimbus-function-error"] == "Timeout"
    assert server.client.get("/function/inv-timeout504").status_code == 200


def test_crashes_fail_only_their_invocation(server: NimbusServer) -> None:
    assert server.deploy("crash", name="inv-crash").status_code == 201
    for how, needle in (
        ("exit", "exit status 3"),
        ("os_exit", "exit status 7"),
        ("segfault", "signal: segmentation fault"),
    ):
        r = server.invoke("inv-crash", {"how": how})
        assert r.headers["x-nimbus-function-error"] == "Crash", how
        assert r.json()["errorType"] == "Runtime.ExitError"
        assert needle in r.json()["errorMessage"], r.json()
        ok = server.invoke("inv-crash", {"how": "none"})
        assert ok.status_code == 200 and ok.json()["alive"] is True


def test_warm_instance_is_reused(server: NimbusServer) -> None:
    assert server.deploy("crash", name="inv-warm").status_code == 201
    pids = {server.invoke("inv-warm", {"how": "none"}).json()["pid"] for _ in range(5)}
    assert len(pids) == 1


def test_payload_too_large_is_413_before_any_instance(server: NimbusServer) -> None:
    assert server.deploy("echo", name="inv-big").status_code == 201
    big = b'{"x": "' + b"a" * (6 * 1024 * 1024) + b'"}'
    r = server.client.post("/function/inv-big", content=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "RequestTooLarge"
    r = server.client.post("/v1/functions/inv-big/invoke", content=big)
    assert r.status_code == 413
    desc = server.client.get("/v1/functions/inv-big").json()
    assert desc["instances"]["total"] == 0


def test_unknown_function_and_bad_event(server: NimbusServer) -> None:
    r = server.client.get("/function/no-such-fn")
    assert r.status_code == 404 and r.json()["error"]["code"] == "ResourceNotFound"
    assert r.headers["x-nimbus-request-id"]
    assert server.invoke("no-such-fn").status_code == 404
    assert server.deploy("echo", name="inv-badjson").status_code == 201
    r = server.client.post("/v1/functions/inv-badjson/invoke", content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["code"] == "InvalidParameterValue"


def test_overload_gets_429_with_retry_after(server: NimbusServer) -> None:
    # slow has scaling.max 1; the server's queue holds 2 for at most 1 s.
    assert server.deploy("slow", name="inv-slow").status_code == 201

    def call(_: int) -> httpx.Response:
        with server.new_client(timeout=30) as c:
            return c.post("/v1/functions/inv-slow/invoke", json={"sleep": 2})

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(call, range(6)))
    codes = sorted(r.status_code for r in results)
    assert codes.count(200) >= 1
    assert 429 in codes
    throttled = next(r for r in results if r.status_code == 429)
    assert throttled.headers["retry-after"] == "1"
    assert throttled.json()["error"]["code"] == "TooManyRequests"


def test_concurrent_requests_scale_out(server: NimbusServer) -> None:
    assert server.deploy("slow", name="inv-scale", scaling={"max": 4}).status_code == 201

    def call(_: int) -> httpx.Response:
        with server.new_client(timeout=30) as c:
            return c.post("/v1/functions/inv-scale/invoke", json={"sleep": 0.5})

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(call, range(4)))
    assert all(r.status_code == 200 for r in results)
    assert server.client.get("/v1/functions/inv-scale").json()["instances"]["total"] == 4


def test_idle_instances_stop_after_keep_warm(server: NimbusServer) -> None:
    assert server.deploy("hello", name="inv-idle", scaling={"keep_warm": 1}).status_code == 201
    assert server.invoke("inv-idle").status_code == 200
    before = set(instance_pids(server.data_dir))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if server.client.get("/v1/functions/inv-idle").json()["instances"]["total"] == 0:
            break
        time.sleep(0.1)
    assert server.client.get("/v1/functions/inv-idle").json()["instances"]["total"] == 0
    assert server.invoke("inv-idle").status_code == 200  # and it scales from zero again
    assert before  # an instance process did exist


def test_base64_roundtrip_is_not_lossy(server: NimbusServer) -> None:
    assert server.deploy("http-full", name="inv-b64").status_code == 201
    payload = os.urandom(2048)
    r = server.client.post(
        "/function/inv-b64/echo",
        content=payload,
        headers={"content-type": "application/octet-stream"},
    )
    assert bytes.fromhex(r.json()["body"]) == payload
    assert base64.b64encode(payload)
