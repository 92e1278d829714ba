"""Durable enqueue rate of the SQLite queue (issue 5's target: >= 2,000 submits/s).

Every submit returns only after its transaction was fsync'd (WAL, synchronous=FULL).
Concurrent: TASKS submitters of PER_TASK submits each, so group commit batches
them; sequential: one submit at a time (one fsync each), for reference. Runs
against a fresh queue in a temporary directory, removed at the end.

    python bench/queue_enqueue.py [--tasks 64] [--per-task 200] [--sequential 2000] [--dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from nimbus.queue import SqliteQueue

PAYLOAD = b'{"source": "bench", "detail": {"n": 1, "text": "hello world"}}'


async def concurrent(path: Path, tasks: int, per_task: int) -> float:
    queue = SqliteQueue(path)
    await queue.open()

    async def submitter(t: int) -> None:
        for i in range(per_task):
            await queue.submit("bench", PAYLOAD, now=time.time(), source=f"bench:{t}:{i}")

    try:
        start = time.perf_counter()
        await asyncio.gather(*(submitter(t) for t in range(tasks)))
        elapsed = time.perf_counter() - start
        assert len(await queue.list(limit=tasks * per_task + 1)) == tasks * per_task
    finally:
        await queue.close()
    return tasks * per_task / elapsed


async def sequential(path: Path, n: int) -> float:
    queue = SqliteQueue(path)
    await queue.open()
    try:
        start = time.perf_counter()
        for _ in range(n):
            await queue.submit("bench", PAYLOAD, now=time.time())
        elapsed = time.perf_counter() - start
    finally:
        await queue.close()
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=64)
    parser.add_argument("--per-task", type=int, default=200)
    parser.add_argument("--sequential", type=int, default=2000)
    parser.add_argument("--dir", type=Path, default=None, help="where the database goes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nimbus-queue-bench-", dir=args.dir) as tmp:
        rate = asyncio.run(concurrent(Path(tmp) / "concurrent.db", args.tasks, args.per_task))
        print(f"concurrent: {args.tasks} tasks x {args.per_task} submits: {rate:,.0f} submits/s")
        rate = asyncio.run(sequential(Path(tmp) / "sequential.db", args.sequential))
        print(f"sequential: {args.sequential} submits one at a time: {rate:,.0f} submits/s")


if __name__ == "__main__":
    main()
