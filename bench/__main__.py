"""`python -m bench` (`make bench`): the five benchmarks one after another, then the total wall time.

Extra arguments (e.g. --smoke, --profile, --what-if PATCH) are passed to each benchmark."""

from __future__ import annotations

import subprocess
import sys
import time

BENCHES = ["token_latency", "connect_auth", "publish_throughput", "sessions_memory", "revocation"]


def main() -> int:
    start = time.monotonic()
    failed = []
    for name in BENCHES:
        if subprocess.run([sys.executable, "-m", f"bench.{name}", *sys.argv[1:]]).returncode != 0:
            failed.append(name)
    print(
        f"\nall benchmarks: {time.monotonic() - start:.0f} s wall"
        + (f"; FAILED: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
