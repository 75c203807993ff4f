"""Waiting on what a test can observe, instead of sleeping and hoping it happened."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable

# A bound for a hung test, never a speed claim: the machine is shared and loaded, so only a
# condition that does not hold at all should reach it.
WITHIN_S = 10.0


async def until(
    check: Callable[[], bool | Awaitable[bool]],
    what: str = "",
    *,
    within: float = WITHIN_S,
    every: float = 0.005,
) -> None:
    """Return once ``check()`` (sync, or async) holds; ``AssertionError`` naming ``what`` if it
    still does not after ``within`` seconds. ``every``: the pause between tries (raise it for
    a check that costs a request). No timing is asserted, only that the condition comes true.
    """
    bound = asyncio.timeout(within)
    try:
        async with bound:
            while True:
                outcome = check()
                if await outcome if inspect.isawaitable(outcome) else outcome:
                    return
                await asyncio.sleep(every)
    except TimeoutError:
        if not bound.expired():  # the check's own timeout: not ours to rename
            raise
        name = what or getattr(check, "__qualname__", "the condition")
        raise AssertionError(f"not true after {within} s: {name}") from None
