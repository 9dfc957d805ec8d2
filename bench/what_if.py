"""`iotauth serve` with one proposed fix patched in, to measure a proposal before anyone makes it.

Usage: python -m bench.what_if PATCH[,PATCH] [iotauth arguments...]; the benchmarks take `--what-if`.
Nothing here is used by the product; each patch is the smallest faithful version of a fix proposed in
docs/performance.md for a file the bench does not own.

- wal-normal: SQLite `synchronous = NORMAL` (WAL mode: no fsync per commit; a power cut may lose the
  last commits, never consistency).
- gc-freeze: once the server has started, `gc.collect(); gc.freeze()` (authsvc/runtime.py), so the
  collector's full passes no longer walk the ~80,000 objects of the imported modules every time.
- gc-off: a diagnostic, not a fix: the garbage collector disabled once the server has started (cyclic
  garbage is then never freed), to show how much of a latency tail its passes make.

The fixes this file once measured (polling state in memory, direct topic checks, JWTs decoded once,
the lazy dummy hash) are now in the product.
"""

from __future__ import annotations

import sys
from typing import Any


def wal_normal() -> None:
    from authsvc.store import Store

    opened = Store.open.__func__  # type: ignore[attr-defined]

    def open_(cls: type[Store], path: Any, *, create: bool = False) -> Store:
        store = opened(cls, path, create=create)
        store.conn.execute("PRAGMA synchronous = NORMAL")
        return store

    Store.open = classmethod(open_)  # type: ignore[method-assign, assignment]


def gc_freeze() -> None:
    import contextlib
    import gc

    import authsvc.runtime

    running = authsvc.runtime.running

    @contextlib.asynccontextmanager
    async def frozen(*args: Any, **kwargs: Any) -> Any:
        async with running(*args, **kwargs) as run:
            gc.collect()
            gc.freeze()
            yield run

    authsvc.runtime.running = frozen  # type: ignore[assignment]


def gc_off() -> None:
    import contextlib
    import gc

    import authsvc.runtime

    running = authsvc.runtime.running

    @contextlib.asynccontextmanager
    async def collector_off(*args: Any, **kwargs: Any) -> Any:
        async with running(*args, **kwargs) as run:
            gc.disable()
            yield run

    authsvc.runtime.running = collector_off  # type: ignore[assignment]


APPLY = {
    "wal-normal": wal_normal,
    "gc-freeze": gc_freeze,
    "gc-off": gc_off,
}


def apply(patches: str) -> None:
    """One patch, or several separated by commas."""
    for patch in patches.split(","):
        APPLY[patch]()


def main() -> None:
    apply(sys.argv.pop(1))
    from authsvc.cli import main as cli

    sys.exit(cli())


if __name__ == "__main__":
    main()
