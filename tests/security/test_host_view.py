"""What a function sees of the host through /proc (finding 8 of #12, confidentiality):
no host path in any process's command line or environment or in the mount table, no
host-wide file of /proc (the kernel's command line, memory, CPU time, load), nothing
that moves with a neighbour's work; and ordinary code that reads /proc still works.

Each check runs from the handler and from the init (module level) of two versions:
one with a function zygote (the init runs in the zygote, the handler in a fork of it,
whose /proc the runtime zygote mounts) and one whose init leaves a file open, so that
it cannot be forked and every instance runs its init itself."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import nimbus
from nimbus.config import Settings
from nimbus.executor.sandbox.enter import INIT_TITLE, RUNTIME_TITLE
from tests.security.attacks import assert_unharmed, attack, deploy, invoke, wait_until
from tests.support import NimbusServer

MEMORY_MB = 128

#: A version whose instances are forks of its function zygote, and one that has none.
KINDS = {
    "function-zygote": {"ATTACK_HOST_VIEW": "1"},
    "no-zygote": {"ATTACK_HOST_VIEW": "1", "ATTACK_UNFORKABLE": "1"},
}


def host_secrets(server: NimbusServer) -> dict[str, str]:
    """What must never show inside: the host's paths and its own /proc files."""
    settings = Settings.from_env(os.environ)
    source = Path(nimbus.__file__).resolve().parent.parent
    found = {
        "data dir": str(server.data_dir.resolve()),
        "cache dir": str(settings.cache_dir.resolve()),
        "Nimbus's source": str(source),
        "the host's kernel command line": Path("/proc/cmdline").read_text().strip(),
        "the host's boot id": Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
    }
    return {what: value for what, value in found.items() if value}


def texts(view: dict[str, Any]) -> dict[str, str]:
    """Every text the view read, by where it came from."""
    out = {}
    for path, outcome in view["files"].items():
        if outcome["ok"]:
            out[path] = outcome["value"]
    for pid, reads in view["processes"].items():
        for what, outcome in reads.items():
            if outcome["ok"]:
                out[f"/proc/{pid}/{what}"] = outcome["value"]
    out["sys.argv"] = "\0".join(view["argv"])
    out["sys.orig_argv"] = "\0".join(view["orig_argv"])
    return out


def server_age(server: NimbusServer) -> float:
    """Seconds since the server started, by the host's boot-time clock."""
    assert server.proc is not None
    with open(f"/proc/{server.proc.pid}/stat") as f:
        started = int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
    return time.clock_gettime(time.CLOCK_BOOTTIME) - started


def check_view(view: dict[str, Any], secrets: dict[str, str], where: str) -> None:
    seen = texts(view)
    assert "/proc/self/mountinfo" in seen and "/proc/1/cmdline" in seen, f"{where}: {seen.keys()}"
    leaks = [
        f"{what} in {source}"
        for source, text in seen.items()
        for what, value in secrets.items()
        if value in text
    ]
    assert leaks == [], f"{where}: the host shows through: {leaks}"

    files = view["files"]
    # The kernel's command line: not the host's.
    assert files["/proc/cmdline"]["value"].strip() == "", files["/proc/cmdline"]
    # Memory: the function's own size, all of it.
    meminfo = dict(
        (line.split(":")[0], line.split(":")[1].split()[0])
        for line in files["/proc/meminfo"]["value"].splitlines()
    )
    assert int(meminfo["MemTotal"]) == MEMORY_MB * 1024, f"{where}: {meminfo}"
    assert int(meminfo["MemAvailable"]) <= MEMORY_MB * 1024
    # CPUs: as many as it may run on, and no time spent by anyone.
    stat_lines = files["/proc/stat"]["value"].splitlines()
    cpus = [line for line in stat_lines if line.startswith("cpu") and line[3].isdigit()]
    assert len(cpus) == view["cpu_count"] > 0, f"{where}: {stat_lines}"
    assert files["/proc/loadavg"]["value"].startswith("0.00 0.00 0.00 "), files["/proc/loadavg"]
    # Its own cgroup is its root.
    cgroup = files["/proc/self/cgroup"]["value"].splitlines()
    assert cgroup and all(line.endswith(":/") for line in cgroup), f"{where}: {cgroup}"
    # The kernel's internals: nobody's to read.
    for path in ("/proc/kallsyms", "/proc/keys", "/proc/timer_list", "/proc/sched_debug"):
        outcome = files[path]
        assert not outcome["ok"] and outcome["errno"] in ("EACCES", "ENOENT"), (path, outcome)
    # Processes: pid 1 is "init", every other one the runtime; no environment.
    procs = view["processes"]
    assert procs["1"]["cmdline"]["value"] == INIT_TITLE + "\0", procs["1"]
    for pid, reads in procs.items():
        if pid != "1" and reads["cmdline"]["ok"]:
            assert reads["cmdline"]["value"] == RUNTIME_TITLE + "\0", (where, pid, reads)
        environ = reads["environ"]
        assert not environ["ok"] or environ["value"].strip("\0") == "", (where, pid, environ)
    assert view["argv"] == ["/var/runtime/bootstrap.py"], view["argv"]
    # Its clocks started with its sandbox (a time namespace): not with the host.
    assert view["monotonic"] < view["age_limit"] and view["boottime"] < view["age_limit"], view


def check_no_procfs_of_its_own(own: dict[str, Any], where: str) -> None:
    """A procfs of its own would show the host's files again: mounting one must fail
    (a function zygote may unshare, never mount; an instance may do neither)."""
    assert not own["mount"].get("ok"), f"{where}: mounted a procfs of its own: {own}"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_nothing_of_the_host_shows_through_proc(server: NimbusServer, kind: str) -> None:
    name = f"sec-view-{kind}"
    deploy(server, name, memory=MEMORY_MB, environment=KINDS[kind])
    secrets = host_secrets(server)
    result = attack(server, name, {"attack": "host_view"})
    assert result["init"] is not None, "the init did not look"
    age = server_age(server)
    for where, seen in (("init", result["init"]), ("handler", result["now"])):
        seen["view"]["age_limit"] = age + 1  # no sandbox of this node is older
        check_view(seen["view"], secrets, f"{kind}, {where}")
        check_no_procfs_of_its_own(seen["own_procfs"], f"{kind}, {where}")
    zygote = server.client.get(f"/v1/functions/{name}").json()["zygote"]["function"]
    assert zygote is (kind == "function-zygote"), zygote
    assert_unharmed(server)


def host_busy() -> float:
    """The host's busy CPU time so far, in seconds (from its own /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def test_proc_stat_does_not_follow_a_neighbours_cpu_use(server: NimbusServer) -> None:
    """The classic side channel: the host's /proc/stat, read twice, says how busy the
    machine was in between, so one function could watch another's work. Inside, it
    reads the same however busy the host is."""
    deploy(server, "sec-view-watcher", memory=MEMORY_MB)
    deploy(server, "sec-view-spinner", timeout=20)
    invoke(server, "sec-view-watcher", {"attack": "hello"})  # warm: no start in the window

    def spin() -> None:
        with server.new_client(timeout=30) as client:
            client.post(
                "/v1/functions/sec-view-spinner/invoke",
                content='{"attack": "spin", "seconds": 6, "processes": 2}',
            )

    spinning = threading.Thread(target=spin, daemon=True)
    spinning.start()

    def neighbour_busy() -> bool:
        before = host_busy()
        time.sleep(0.2)
        return host_busy() - before > 0.2  # over half a CPU: the spinner runs

    assert wait_until(neighbour_busy, 15), "the neighbour never started spinning"
    before = host_busy()
    window = attack(server, "sec-view-watcher", {"attack": "stat_window", "seconds": 1.5})
    host_delta = host_busy() - before
    spinning.join(30)
    assert host_delta > 1.0, f"the neighbour did not keep the host busy ({host_delta:.2f} s)"
    assert window["first"] == window["last"], (
        "/proc/stat moved with the neighbour's CPU use:\n"
        + window["first"].splitlines()[0]
        + "\n"
        + window["last"].splitlines()[0]
    )
    assert_unharmed(server)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_ordinary_code_that_reads_proc_still_works(server: NimbusServer, kind: str) -> None:
    name = f"sec-ordinary-{kind}"
    deploy(server, name, memory=MEMORY_MB, environment=KINDS[kind])
    seen = attack(server, name, {"attack": "ordinary"})
    assert seen["cpu_count"] == seen["mp_cpu_count"] == seen["affinity"] > 0, seen
    assert seen["status_name"] and seen["status_vmrss"].endswith("kB"), seen
    assert seen["self_stat_fields"] >= 49, seen  # psutil reads up to the start time
    assert len(seen["statm"].split()) == 7, seen["statm"]
    assert {"0", "1", "2", "3"} <= set(seen["fds"]), seen["fds"]
    assert seen["pids"][0] == 1, seen["pids"]
    commands = seen["commands"]
    for name_, outcome in commands.items():
        assert outcome["ok"] and outcome["value"]["rc"] == 0, (name_, outcome)
    ps = commands["ps"]["value"]["out"]
    assert INIT_TITLE in ps and RUNTIME_TITLE in ps, ps
    free = next(
        line for line in commands["free"]["value"]["out"].splitlines() if line[:4] == "Mem:"
    )
    assert int(free.split()[1]) == MEMORY_MB * 1024, free
    assert int(commands["nproc"]["value"]["out"]) == seen["cpu_count"]
    assert "load average: 0.00, 0.00, 0.00" in commands["uptime"]["value"]["out"]
    assert_unharmed(server)
