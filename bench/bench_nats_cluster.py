"""How long eventwire stalls when a node of a 3-node NATS JetStream cluster dies (issue 13),
beside a plain nats-py client publishing to the same stream in the same run.

Each run starts a fresh cluster of private nats-servers on free local ports, publishes 400
events a second (one awaited publish at a time) to a 3-replica stream while a subscription
handles them, SIGKILLs a node, restarts it once the others carry on and its replica has caught
up, then kills the stream's new leader and restarts it (`tests/nats_cluster.py`). Reported per
kill: the longest time without a handled event, without a returned eventwire publish, and
without a returned plain nats-py publish (retried every 0.25 s: the cluster's own failover
time).

Usage (from the repository root; needs nats-server installed)::

    .venv/bin/python bench/bench_nats_cluster.py [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import get_args

BENCH_DIR = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH_DIR.parent)]  # the repository root, for tests.nats_cluster

from bench_core import cpu_model  # noqa: E402

from tests.nats_cluster import OutageReport, Victim, nats_cluster, outage_run  # noqa: E402


async def one_run(victim: Victim) -> OutageReport:
    with tempfile.TemporaryDirectory(prefix="ew-cluster-") as root:
        async with nats_cluster(Path(root)) as cluster:
            report = await outage_run(cluster, victim)
    if report.handled != report.published or report.duplicates:
        raise SystemExit(f"lost or duplicated events: {report}")
    return report


def row(what: str, stalls: list[float]) -> str:
    return f"| {what} | {statistics.median(stalls):.2f} | {min(stalls):.2f} | {max(stalls):.2f} |"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per victim")
    args = parser.parse_args()
    print(
        f"{args.runs} runs per victim; {platform.machine()}, {cpu_model()}, "
        f"Python {platform.python_version()}\n"
    )
    print("| Kill | Stall (s): median | min | max |")
    print("|---|---|---|---|")
    for victim in get_args(Victim):
        reports = [await one_run(victim) for _ in range(args.runs)]
        first = victim if victim != "stream leader" else "the stream's leader"
        kinds = (
            ("eventwire handling", "handling_stalls"),
            ("eventwire publishing", "publish_stalls"),
            ("plain nats-py publishing", "plain_publish_stalls"),
        )
        for label, rounds in ((f"1st: {first}", 0), ("2nd: the stream's new leader", 1)):
            for what, field in kinds:
                stalls = [getattr(report, field)[rounds] for report in reports]
                print(row(f"{label}, {what}", stalls), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
