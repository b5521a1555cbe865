"""Send a test's independent requests at once, so that the server batches them: one decode
step then serves every row, where one request after another pays a step per row; on a
shared CPU that is most of what such a test costs. Results come back in the calls' order,
and the first call that raised raises here."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable


def at_once(*calls: Callable[[], Any]) -> list:
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
    return [future.result() for future in futures]
