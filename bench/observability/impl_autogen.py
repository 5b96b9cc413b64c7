"""The chain on autogen-core's `SingleThreadedAgentRuntime`, with the core benchmark's
`Researcher` and `Reporter` agents (``bench/impl_autogen.py``).

Modes: ``off`` (``AUTOGEN_DISABLE_RUNTIME_TRACING=true``: autogen's no-op provider),
``api`` (autogen's default: the global provider, which without an SDK hands out
non-recording spans), ``sdk`` (``SingleThreadedAgentRuntime(tracer_provider=...)``).
"""

from __future__ import annotations

import os
from functools import partial

from autogen_core import SingleThreadedAgentRuntime, TopicId, TypeSubscription
from common import Metrics
from impl_autogen import SOURCE, Query, Reporter, Researcher

from observability.chain import ChainSizes, Tally, time_chains
from observability.otel import Setup

MODES = ("off", "api", "sdk")


async def run(mode: str, sizes: ChainSizes, verify: bool) -> Metrics:
    setup = Setup(mode, verify=verify)  # type: ignore[arg-type]
    if mode == "off":
        os.environ["AUTOGEN_DISABLE_RUNTIME_TRACING"] = "true"  # read when the runtime is built
    tally = Tally()
    runtime = SingleThreadedAgentRuntime(tracer_provider=setup.provider)
    await Researcher.register(runtime, "researcher", Researcher)
    await runtime.add_subscription(TypeSubscription("user.query", "researcher"))
    await Reporter.register(runtime, "reporter", partial(Reporter, tally))  # type: ignore[arg-type]
    await runtime.add_subscription(TypeSubscription("research.complete", "reporter"))
    topic = TopicId("user.query", SOURCE)

    async def publish_root(index: int) -> None:
        await runtime.publish_message(Query(index), topic)

    runtime.start()
    metrics = await time_chains(publish_root, tally, sizes, setup)
    await runtime.stop_when_idle()
    metrics.update(setup.span_metrics(sizes.warmup + sizes.roots))
    if verify:
        metrics["span_names"] = setup.span_names()  # type: ignore[assignment]
    setup.shutdown()
    return metrics
