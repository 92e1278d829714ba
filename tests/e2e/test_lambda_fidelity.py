"""What a Lambda function meets is Lambda's: environment, context, logging, errors, URLs.

Against a real, sandboxed ``nimbus up``; forked instances (function zygotes) unless a
test says otherwise.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from tests.support import NimbusServer, running


def logs_of(server: NimbusServer, name: str, rid: str) -> list[str]:
    records = server.wait_logs(
        name,
        lambda rs: any(
            x["request_id"] == rid and ("REPORT" in x["message"] or "report" in x["message"])
            for x in rs
        ),
    )
    return [x["message"] for x in records if x["request_id"] == rid]


def test_the_environment_is_lambdas(server: NimbusServer) -> None:
    assert server.deploy("lambda-env", name="fid-env").status_code == 201
    trace = "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1"
    client_context = {"custom": {"k": "v"}, "env": {"locale": "en"}, "client": {"app_title": "t"}}
    r = server.invoke(
        "fid-env",
        headers={
            "x-amzn-trace-id": trace,
            "x-amz-client-context": base64.b64encode(json.dumps(client_context).encode()).decode(),
        },
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert "env" in out, out
    env = out["env"]
    assert env["AWS_REGION"] == env["AWS_DEFAULT_REGION"] == "us-east-1"
    assert out["at_init"] == {
        "AWS_REGION": "us-east-1",
        "AWS_LAMBDA_INITIALIZATION_TYPE": "snap-start",
    }
    assert env["TZ"] == ":UTC" and env["LANG"] == "en_US.UTF-8"
    assert env["PATH"].split(":")[0] == "/var/lang/bin"
    assert "/opt/lib" in env["LD_LIBRARY_PATH"] and "/var/task/lib" in env["LD_LIBRARY_PATH"]
    assert env["LAMBDA_RUNTIME_DIR"] == "/var/runtime" and env["LAMBDA_TASK_ROOT"] == "/var/task"
    assert env["_X_AMZN_TRACE_ID"] == trace
    assert env["AWS_EXECUTION_ENV"] == "AWS_Lambda_python3.11"
    assert not any(str(server.data_dir) in v or "/root/" in v for v in env.values()), env
    assert out["arn"] == "arn:aws:lambda:us-east-1:000000000000:function:fid-env"
    assert out["identity"] == [None, None]  # an identity object, as awslambdaric gives
    assert out["client_context"] == {
        "custom": {"k": "v"},
        "env": {"locale": "en"},
        "app_title": "t",
    }
    assert out["tenant_id"] is None
    # A shell, its tools, the interpreter on PATH, a bundled script, locales, certificates.
    # (Lambda's PATH spells /usr/bin/ with its slash: so does command -v.)
    assert out["sh"] == [0, "42\n/usr/bin//curl\n/var/lang/bin/python3\n", ""]
    assert out["script"] == [0, "hello ada from /var/task\n", ""]
    assert out["script_direct"] == [0, "hello bob from /var/task\n", ""]
    assert out["python3"][:2] == [0, "3\n"]
    assert out["locale"] == "en_US.UTF-8" and out["tz"] == "UTC"
    assert out["certs"] > 100_000
    # Without a trace header, Nimbus makes one per invocation, as Lambda does.
    first = server.invoke("fid-env").json()["env"]["_X_AMZN_TRACE_ID"]
    second = server.invoke("fid-env").json()["env"]["_X_AMZN_TRACE_ID"]
    assert first.startswith("Root=1-") and ";Parent=" in first and first != second


def test_a_bad_client_context_is_refused(server: NimbusServer) -> None:
    assert server.deploy("hello", name="fid-cc").status_code == 201
    r = server.invoke("fid-cc", headers={"x-amz-client-context": "not base64 json!"})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "InvalidParameterValue"
    assert "X-Amz-Client-Context" in r.json()["error"]["message"]


@pytest.mark.parametrize("zygotes", [True, False], ids=["forked", "no-zygotes"])
def test_logging_set_up_at_init_survives_and_nothing_is_doubled(
    zygotes: bool, server: NimbusServer, tmp_path: Path
) -> None:
    def check(node: NimbusServer) -> None:
        assert node.deploy("logging-idioms", name="fid-logs").status_code == 201
        for _ in range(2):  # a cold and a warm invocation, same lines
            r = node.invoke("fid-logs")
            assert r.json()["handlers"] == 1, r.text
            rid = r.headers["x-nimbus-request-id"]
            lines = [m for m in logs_of(node, "fid-logs", rid) if "line" in m or "trace" in m]
            assert lines == [
                f"CUSTOM INFO {rid} root line",
                f"CUSTOM WARNING {rid} child line",
                '{"lib": "lib line"}',
                lines[3],
            ], lines
            # logging.exception: one record, the traceback's lines joined as Lambda joins them
            assert lines[3].startswith(f"CUSTOM ERROR {rid} with a traceback\rTraceback")
            assert 'raise ValueError("boom")' in lines[3]

    if zygotes:
        check(server)
        return
    with running(tmp_path / "data", args=["--no-function-zygotes"]) as node:
        check(node)


def test_json_log_format_and_levels(server: NimbusServer) -> None:
    assert server.deploy("logging-json", name="fid-json").status_code == 201
    r = server.invoke("fid-json")
    assert r.json() == {"level": 10}  # DEBUG: the application level is the root's
    rid = r.headers["x-nimbus-request-id"]
    lines = logs_of(server, "fid-json", rid)
    records = [json.loads(m) for m in lines if m.startswith("{")]
    kinds = [x.get("type") or x.get("level") for x in records]
    assert kinds == ["platform.start", "DEBUG", "INFO", "platform.report"], lines
    start, _debug, info, report = records
    assert start["record"] == {"requestId": rid, "version": "1"}
    assert info["message"] == "order placed" and info["order_id"] == 42
    assert info["logger"] == "orders" and info["requestId"] == rid
    assert info["timestamp"].endswith("Z")
    metrics = report["record"]["metrics"]
    assert set(metrics) >= {"durationMs", "billedDurationMs", "memorySizeMB", "maxMemoryUsedMB"}
    assert report["record"]["status"] == "success"
    assert "a plain print stays plain" in lines
    # An error: one JSON record, Lambda's shape.
    r = server.invoke("fid-json", {"fail": True})
    rid = r.headers["x-nimbus-request-id"]
    error = next(json.loads(m) for m in logs_of(server, "fid-json", rid) if '"log_level"' in m)
    assert error["errorType"] == "KeyError" and error["log_level"] == "ERROR"
    assert error["requestId"] == rid and error["stackTrace"]


def test_system_level_warn_hides_start_end_and_report(server: NimbusServer) -> None:
    r = server.deploy(
        "print-lots", name="fid-quiet", logging={"format": "JSON", "system_level": "WARN"}
    )
    assert r.status_code == 201, r.text
    rid = server.invoke("fid-quiet", {"lines": 1}).headers["x-nimbus-request-id"]
    records = server.wait_logs("fid-quiet", lambda rs: any(x["message"] == "line 0" for x in rs))
    mine = [x["message"] for x in records if x["request_id"] == rid]
    assert "line 0" in mine
    assert not any("platform." in m or m.startswith(("START", "END", "REPORT")) for m in mine)


def test_levels_need_the_json_format(server: NimbusServer) -> None:
    r = server.deploy("hello", name="fid-level", logging={"application_level": "DEBUG"})
    assert r.status_code == 400
    assert "format: JSON" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("fixture", "error_type", "message", "frame"),
    [
        ("init-syntax", "Runtime.UserCodeSyntaxError", "Syntax error in module 'app'", "app.py"),
        ("init-raises", "JSONDecodeError", "Expecting property name", "/var/lang/lib/python3.11"),
        ("init-error", "Runtime.ImportModuleError", "Unable to import module 'app'", None),
    ],
)
def test_init_errors_are_lambdas(
    server: NimbusServer, fixture: str, error_type: str, message: str, frame: str | None
) -> None:
    name = f"fid-{fixture}"
    assert server.deploy(fixture, name=name, force=True).status_code == 201
    r = server.invoke(name)
    err = r.json()
    assert r.headers["x-nimbus-function-error"] == "Init"
    assert err["errorType"] == error_type and message in err["errorMessage"], err
    if frame is not None:
        assert any(frame in line for line in err["stackTrace"]), err
    for line in err["stackTrace"]:
        assert "bootstrap" not in line and "/root/" not in line, err


def test_each_function_has_a_host_of_its_own(server: NimbusServer) -> None:
    assert server.deploy("http-full", name="fid-host").status_code == 201
    host = f"fid-host.localhost:{server.port}"
    r = server.client.post("/echo?x=1", json={"k": "v"}, headers={"host": host})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["path"] == "/echo" and body["query"] == {"x": "1"}
    assert json.loads(body["body"]) == {"k": "v"}
    event = server.client.get("/event", headers={"host": host}).json()
    assert event["rawPath"] == "/event"
    assert event["requestContext"]["domainName"] == host
    assert event["requestContext"]["domainPrefix"] == "fid-host"
    assert "x-forwarded-prefix" not in event["headers"]
    # The Nimbus API's own paths belong to the function on its host.
    assert server.client.get("/v1/functions", headers={"host": host}).json()["rawPath"] == (
        "/v1/functions"
    )
    # Under the shared prefix, the app is told where it is mounted.
    event = server.client.get("/function/fid-host/event").json()
    assert event["rawPath"] == "/event"
    assert event["headers"]["x-forwarded-prefix"] == "/function/fid-host"
    assert event["headers"]["x-amzn-trace-id"].startswith("Root=1-")
    assert event["headers"]["x-forwarded-for"] == "127.0.0.1"
    unknown = server.client.get("/", headers={"host": f"nope.localhost:{server.port}"})
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "ResourceNotFound"
