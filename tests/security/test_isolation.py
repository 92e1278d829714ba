"""A function cannot read what is not its own, see or touch other processes, or gain
privileges: every attack is tried for real inside a sandboxed instance."""

from __future__ import annotations

import os
import secrets

from tests.security.attacks import (
    ATTACKER,
    ENV_MARKER,
    FIRST_UID,
    POOL,
    VICTIM,
    assert_denied,
    assert_unharmed,
    attack,
    codes,
    deploy,
    invoke,
    proc_uid,
    wait_until,
)
from tests.support import FIXTURES, NimbusServer, instance_pids

# -- reading what is not ours ------------------------------------------------------------


def test_cannot_read_host_secrets_or_the_data_dir(server: NimbusServer) -> None:
    deploy(server, "sec-read-host")
    data_dir = str(server.data_dir.resolve())
    paths = {
        "/etc/shadow": {"ENOENT"},  # not in the sandbox's root at all
        "/etc/sudoers": {"ENOENT"},
        "/root/.ssh": {"ENOENT"},
        "/root/.bash_history": {"ENOENT"},
        data_dir: {"ENOENT"},
        f"{data_dir}/nimbus.db": {"ENOENT"},
        f"{data_dir}/logs.db": {"ENOENT"},
        # pid 1 is the sandbox's init, running as root: not ours to read.
        "/proc/1/environ": {"EACCES"},
        "/proc/1/root": {"EACCES"},
        "/proc/1/mem": {"EACCES"},
        "/proc/kcore": {"EACCES", "ENOENT"},
        "/sys/fs/cgroup": {"ENOENT"},
        "/dev/mem": {"ENOENT"},
        "/dev/ptmx": {"ENOENT"},
    }
    # The base root's own directories for these are empty: nothing of the host's.
    empty = ["/home", "/var/log"]
    asked = [*paths, *empty]
    results = attack(server, "sec-read-host", {"attack": "read", "paths": asked})["results"]
    for path, errnos in paths.items():
        assert_denied(results[path], errnos, f"reading {path}")
    for path in empty:
        outcome = results[path]
        assert outcome == {"ok": True, "value": {"dir": []}} or outcome.get("errno") in (
            "ENOENT",
            "EACCES",
        ), f"reading {path}: {outcome}"
    assert_unharmed(server)


def test_cannot_read_another_functions_code(server: NimbusServer) -> None:
    deploy(server, "sec-read-victim", VICTIM)
    deploy(server, "sec-read-code")
    victim = server.client.get("/v1/functions/sec-read-victim").json()
    code_dir = f"{server.data_dir.resolve()}/code/{victim['code_sha256']}"
    assert os.path.isfile(f"{code_dir}/secret.txt"), "the victim's code is not where expected"
    paths = [code_dir, f"{code_dir}/secret.txt", f"{code_dir}/app.py", "/var/task/secret.txt"]
    results = attack(server, "sec-read-code", {"attack": "read", "paths": paths})["results"]
    for path in paths:
        assert_denied(results[path], {"ENOENT"}, f"reading {path}")

    # /var/task is the attacker's own code, and only that.
    me = attack(server, "sec-read-code", {"attack": "whoami"})
    assert set(me["task"]) - {"__pycache__"} == {"app.py", "nimbus.yaml"}, me["task"]
    own = (FIXTURES / ATTACKER / "app.py").read_text()
    assert me["task_app"] == own, "/var/task/app.py is not the attacker's own code"
    assert invoke(server, "sec-read-victim", {}).json()["code_secret_len"] > 0
    assert_unharmed(server)


def test_cannot_see_the_servers_environment(server: NimbusServer) -> None:
    assert server.env.get("NIMBUS_SECURITY_TEST_MARKER") == ENV_MARKER
    deploy(server, "sec-environ")
    result = attack(server, "sec-environ", {"attack": "environ_scan", "marker": ENV_MARKER})
    assert result["found"] == [], f"the server's environment leaked into: {result['found']}"
    assert "NIMBUS_SECURITY_TEST_MARKER" not in result["environ_keys"]
    # The scan did look: at least our own processes' command lines were readable.
    assert result["readable"], result
    assert_unharmed(server)


def test_cannot_read_another_functions_secrets_from_inherited_memory(
    server: NimbusServer,
) -> None:
    """Instances are forked from one zygote (through sandboxes it makes ahead of demand),
    and the zygote reads every function's spawn message, environment included. What it
    leaves in its memory, every sandbox forked after inherits: a later instance of
    *another* function must not find the victim's secret there.

    Whether a copy survives depends on the heap's layout, so the victim starts several
    times, and after each start, other functions cold-start until one has had a sandbox
    made after it (the pool is first in, first out)."""
    key = "\n".join(
        ["-----BEGIN PRIVATE KEY-----"]
        + [secrets.token_urlsafe(48) for _ in range(25)]
        + ["-----END PRIVATE KEY-----"]
    )
    environment = {"DB_HOST": "db.internal", "DB_USER": "app", "PRIVATE_KEY": key}
    # Each start of the victim in a sandbox of its own (with function zygotes: a new
    # zygote each time, each made from a shell of the pool).
    scaling = {"keep_warm": 0, "zygote_keep_warm": 0}
    deploy(server, "sec-mem-victim", VICTIM, environment=environment, scaling=scaling)
    snapshot = {"ATTACK_SNAPSHOT": "1"}  # the attacker copies its memory first thing

    # Positive control: the attacker does find its *own* environment in memory it inherited.
    canary = f"canary-{secrets.token_hex(12)}"
    deploy(server, "sec-mem-attacker-0", environment={**snapshot, "ATTACKER_CANARY": canary})
    own = attack(
        server, "sec-mem-attacker-0", {"attack": "memory_scan", "needle_codes": codes(canary)}
    )
    assert own["at_import"] > 0, f"the memory scan does not work: {own}"

    needle = key[-100:-30]
    attempts = 0
    for victim_start in range(1, 4):
        before = set(instance_pids(server.data_dir))
        invoke(server, "sec-mem-victim", {})  # the zygote has now read the victim's secrets
        if POOL:
            # An idle node makes sandboxes ahead of demand, forked from the zygote as it
            # is now: wait for one (it runs as root until a function claims it).
            def made_since(before: set[int] = before) -> list[int]:
                pids = instance_pids(server.data_dir)
                return [p for p in pids if p not in before and proc_uid(p) == 0]

            assert wait_until(made_since, 15), "the node made no new sandbox"
        for _ in range(POOL + 1):
            attempts += 1
            name = f"sec-mem-attacker-{attempts}"
            deploy(server, name, environment=snapshot, scaling={"keep_warm": 0})
            event = {"attack": "memory_scan", "needle_codes": codes(needle)}
            found = attack(server, name, event)
            assert found["at_import"] == 0 and found["now"] == 0, (
                f"a cold start of another function (after the victim's start {victim_start}) "
                f"found the victim's PRIVATE_KEY in memory it inherited: {found['hits']}"
            )
    assert_unharmed(server)


# -- other processes ----------------------------------------------------------------------


def test_sees_only_its_own_processes(server: NimbusServer) -> None:
    assert server.proc is not None
    host_pid = server.proc.pid
    deploy(server, "sec-procs")
    result = attack(server, "sec-procs", {"attack": "procs", "host_pid": host_pid})
    assert result["pids"] == sorted({1, result["me"]}), (
        f"/proc lists more than the sandbox's init and the instance: {result['cmdlines']}"
    )
    assert not result["host_pid_visible"], f"the server's pid {host_pid} is visible"
    assert_denied(result["probe_host"], {"ESRCH"}, f"kill({host_pid}, 0)")
    assert_denied(result["kill_host"], {"ESRCH"}, f"kill({host_pid}, SIGKILL)")
    if result["kill_init"]["ok"]:
        # pid 1 (the instance's init) runs as the function's uid, so kill() is allowed,
        # but the kernel drops it: a namespace's init gets no signal it has no handler
        # for from inside. The same (warm) instance answers again: init is alive.
        cold = server.client.get("/v1/functions/sec-procs").json()["starts"]["cold"]
        assert attack(server, "sec-procs", {"attack": "hello"})["hello"] == "from the attacker"
        assert server.client.get("/v1/functions/sec-procs").json()["starts"]["cold"] == cold
    else:
        assert_denied(result["kill_init"], {"EPERM"}, "kill(1, SIGKILL)")
    assert_denied(result["kill_everyone"], {"ESRCH", "EPERM"}, "kill(-1, SIGKILL)")
    assert server.proc.poll() is None, "the server died"
    assert_unharmed(server)


def test_cannot_ptrace_or_read_other_processes_memory(server: NimbusServer) -> None:
    assert server.proc is not None
    host_pid = server.proc.pid
    deploy(server, "sec-ptrace")
    result = attack(server, "sec-ptrace", {"attack": "ptrace", "pids": [1, host_pid]})
    for pid in ("1", str(host_pid)):
        assert_denied(result["attach"][pid], {"EPERM"}, f"ptrace(PTRACE_ATTACH, {pid})")
        assert_denied(result["vm_readv"][pid], {"EPERM"}, f"process_vm_readv({pid})")
    # Both are allowed to anyone on themselves: only the seccomp filter refuses them.
    assert_denied(result["traceme"], {"EPERM"}, "ptrace(PTRACE_TRACEME)")
    assert_denied(result["vm_readv_self"], {"EPERM"}, "process_vm_readv(self)")
    assert_unharmed(server)


# -- privileges ---------------------------------------------------------------------------


def test_has_no_privileges_to_gain(server: NimbusServer) -> None:
    deploy(server, "sec-privs")
    result = attack(server, "sec-privs", {"attack": "setuid"})
    assert result["walked"] > 100, f"the walk of / saw almost nothing: {result}"
    assert result["setuid_files"] == [], f"setuid/setgid files reachable: {result['setuid_files']}"
    for what in ("setuid0", "setgid0", "setresuid0", "setgroups0"):
        # EINVAL: in a function zygote's user namespace, id 0 does not even exist.
        assert_denied(result[what], {"EPERM", "EINVAL"}, what)
    assert not result["raise_nofile"]["ok"], f"raised RLIMIT_NOFILE: {result['raise_nofile']}"
    assert result["rlimits"]["nofile"] == [1024, 1024]
    assert result["rlimits"]["core"] == [0, 0]
    assert result["rlimits"]["fsize"] == [512 << 20, 512 << 20]

    me = attack(server, "sec-privs", {"attack": "whoami"})
    assert me["caps"] == {k: "0000000000000000" for k in me["caps"]}, me["caps"]
    assert me["no_new_privs"] == 1
    assert me["dumpable"] == 0
    assert me["seccomp"] == "2", "no seccomp filter"
    assert me["groups"] == []
    assert me["uid"] == me["euid"] == me["gid"] >= FIRST_UID, me
    assert me["hostname"] == "sec-privs"
    assert_unharmed(server)


def test_every_function_has_its_own_uid(server: NimbusServer) -> None:
    deploy(server, "sec-uid-a")
    deploy(server, "sec-uid-b")
    a = attack(server, "sec-uid-a", {"attack": "whoami"})
    b = attack(server, "sec-uid-b", {"attack": "whoami"})
    assert a["uid"] >= FIRST_UID and b["uid"] >= FIRST_UID, (a["uid"], b["uid"])
    assert a["uid"] != b["uid"], f"two functions share uid {a['uid']}"
    # A new version keeps the function's uid.
    r = server.update("sec-uid-a", spec={"memory": 256})
    assert r.status_code == 200, r.text
    assert attack(server, "sec-uid-a", {"attack": "whoami"})["uid"] == a["uid"]
    assert_unharmed(server)


def test_holds_no_file_descriptor_but_its_own(server: NimbusServer) -> None:
    """Nothing of the zygote or the server is inherited: a directory fd from outside the
    root, or the zygote's control socket, would be a way out."""
    deploy(server, "sec-fds")
    result = attack(server, "sec-fds", {"attack": "fds"})
    fds = result["fds"]
    assert result["dir_escapes"] == {}, f"directory fds: {result['dir_escapes']}"
    assert fds["0"]["target"] == "/dev/null", fds
    assert fds["1"]["target"].startswith("pipe:") and fds["2"] == fds["1"], fds
    assert fds["3"]["target"].startswith("socket:"), fds
    others = {fd: info for fd, info in fds.items() if fd not in ("0", "1", "2", "3")}
    # The shim keeps /proc/self/status open (it reads its peak memory from there).
    unexpected = {
        fd: info
        for fd, info in others.items()
        if not (info["target"].startswith("/proc/") and info["target"].endswith("/status"))
    }
    assert unexpected == {}, f"file descriptors the instance did not open: {unexpected}"
    assert_unharmed(server)


def test_the_data_dir_is_the_servers_alone(server: NimbusServer) -> None:
    """Finding 8 of #12: the data dir was 755 and its databases 644."""
    import stat

    assert stat.S_IMODE(server.data_dir.stat().st_mode) == 0o700
    dbs = sorted(server.data_dir.glob("*.db*"))
    assert {p.name for p in dbs} >= {"nimbus.db", "logs.db", "queue.db"}
    for db in dbs:
        assert stat.S_IMODE(db.stat().st_mode) == 0o600, db
