"""Which records of a batch failed: the pure decision after each invocation, with
Lambda's rules for partial batch responses (``ReportBatchItemFailures``).

:func:`judge` takes the invocation's error (if any), its result, the ids of the batch's
records and the trigger's ``report_batch_item_failures``, and applies, in order:

1. A function error (an exception, a timeout, a crash) fails the whole batch.
2. With ``report_batch_item_failures`` off, any result is a success of the whole batch
   (as Lambda ignores the result without the setting).
3. A result that is not a JSON object with a ``batchItemFailures`` key is a success of
   the whole batch. (Lambda, with the setting on, also fails a batch whose response it
   cannot read; here the setting is on by default, so a function that returns anything
   else keeps working as it would without it.)
4. ``batchItemFailures`` null or ``[]``: every record succeeded.
5. ``batchItemFailures`` that is not a list, or an entry in it that is not an object
   with an ``itemIdentifier`` (a missing key, null, empty, not a string, or the id of
   no record in the batch): the whole batch failed.
6. Otherwise exactly the records named failed; the others succeeded. (Two records of a
   batch with the same id fail together: retrying both is at least once.)

What the caller does with the outcome (ack, retry with backoff, dead-letter) is
:mod:`nimbus.triggers.dispatch`'s.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Literal

import orjson

#: The result key of a partial batch response, and each entry's.
FAILURES_KEY = "batchItemFailures"
ITEM_KEY = "itemIdentifier"


@dataclass(frozen=True, slots=True)
class Outcome:
    """``succeeded``: every record; ``failed``: the whole batch (``reason`` says why);
    ``partial``: the records whose ids are in ``failed_ids``, and only those."""

    kind: Literal["succeeded", "partial", "failed"]
    failed_ids: frozenset[str] = frozenset()
    reason: str | None = None


SUCCEEDED = Outcome("succeeded")


def judge(error: str | None, result: bytes, ids: Collection[str], *, report: bool) -> Outcome:
    """The outcome of one invocation of a batch whose records have ``ids``."""
    if error is not None:
        return Outcome("failed", reason=f"the function failed ({error})")
    if not report:
        return SUCCEEDED
    try:
        response: Any = orjson.loads(result) if result else None
    except orjson.JSONDecodeError:
        return SUCCEEDED
    if not isinstance(response, dict) or FAILURES_KEY not in response:
        return SUCCEEDED
    failures = response[FAILURES_KEY]
    if failures is None or failures == []:
        return SUCCEEDED
    if not isinstance(failures, list):
        return Outcome("failed", reason=f"{FAILURES_KEY} is not a list")
    named: set[str] = set()
    for i, entry in enumerate(failures):
        where = f"{FAILURES_KEY}[{i}]"
        if not isinstance(entry, dict) or ITEM_KEY not in entry:
            return Outcome("failed", reason=f"{where} has no {ITEM_KEY}")
        item = entry[ITEM_KEY]
        if not isinstance(item, str) or not item:
            return Outcome("failed", reason=f"{where}.{ITEM_KEY} is {item!r}, not an id")
        if item not in ids:
            return Outcome(
                "failed", reason=f"{where}.{ITEM_KEY} {item!r} is no record of the batch"
            )
        named.add(item)
    return Outcome("partial", failed_ids=frozenset(named))
