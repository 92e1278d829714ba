"""The view of /proc a sandbox gets instead of the host's: pure rendering."""

from __future__ import annotations

from nimbus.executor.sandbox.procfs import MASKED, VIRTUAL, HostFacts, meminfo, render

FACTS = HostFacts(
    cpus=4,
    cpuinfo=b"processor\t: 0\nmodel name\t: Some CPU\ncpu MHz\t\t: 2000.000\n",
    vmstat_keys=("nr_free_pages", "pgfault"),
    file_max=9223372036854775807,
)
MB = 1 << 20


def view(memory_mb: int = 128, *, booted: float = 1_700_000_000.0, age: float = 12.5) -> dict:
    return {
        k: v.decode()
        for k, v in render(memory_mb * MB, FACTS, booted=booted, now=booted + age).items()
    }


def fields(text: str) -> dict[str, str]:
    return {line.split(":")[0]: line.split(":")[1].strip() for line in text.splitlines()}


def test_every_virtual_file_is_rendered_and_none_is_also_masked() -> None:
    assert set(view()) == set(VIRTUAL)
    assert not set(VIRTUAL) & set(MASKED)


def test_meminfo_is_the_sandboxs_memory_all_free_no_swap() -> None:
    info = fields(view(256)["meminfo"])
    assert info["MemTotal"] == info["MemFree"] == info["MemAvailable"] == f"{256 * 1024} kB"
    assert info["SwapTotal"] == info["SwapFree"] == "0 kB"
    assert info["HugePages_Total"] == "0"  # no unit, as the kernel writes it
    # The kernel's layout: the name and colon in 16 columns, the value right-aligned in 8.
    assert meminfo(128 * MB).splitlines()[0] == "MemTotal:         131072 kB"


def test_stat_has_a_line_per_cpu_and_no_time_spent_but_idle() -> None:
    lines = view()["stat"].splitlines()
    cpus = [line for line in lines if line.startswith("cpu") and line[3].isdigit()]
    assert len(cpus) == FACTS.cpus  # what glibc counts for os.cpu_count() without /sys
    for line in cpus:
        user, nice, system, idle, *rest = (int(x) for x in line.split()[1:])
        assert user == nice == system == sum(rest) == 0 and idle == 1250
    assert lines[0].split()[4] == str(1250 * FACTS.cpus)
    assert "btime 1700000000" in lines


def test_a_fresh_sandbox_never_divides_by_zero() -> None:
    first = view(age=0)["stat"].splitlines()[0].split()[1:]
    assert sum(int(x) for x in first) > 0


def test_uptime_is_the_sandboxs_own_age_and_load_is_nil() -> None:
    out = view(age=12.5)
    assert out["uptime"] == "12.50 50.00\n"
    assert out["loadavg"].startswith("0.00 0.00 0.00 ")


def test_nothing_of_the_host_but_its_cpus_and_their_model() -> None:
    out = view()
    assert out["cmdline"] == "\n"
    assert out["cpuinfo"] == FACTS.cpuinfo.decode()
    assert out["vmstat"] == "nr_free_pages 0\npgfault 0\n"
    assert out["diskstats"] == "" and out["swaps"].startswith("Filename")
    assert out["sys/fs/file-nr"] == f"0\t0\t{FACTS.file_max}\n"
    # A boot id of its own: the host's would be the same in every sandbox on it.
    assert view()["sys/kernel/random/boot_id"] != out["sys/kernel/random/boot_id"]


def test_interrupts_and_softirqs_have_columns_for_every_cpu_and_only_zeros() -> None:
    out = view()
    assert out["interrupts"].split() == ["CPU0", "CPU1", "CPU2", "CPU3"]
    rows = out["softirqs"].splitlines()[1:]
    assert rows and all(row.split()[1:] == ["0"] * FACTS.cpus for row in rows)
