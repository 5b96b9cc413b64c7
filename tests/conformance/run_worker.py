"""A worker process for the durable-run crash tests: handles `agent.task` events with a
six-step durable agent (three model steps, a gather of two searches, a wait for approval, an
email effect) and writes a ledger line for each thing it does (an O_APPEND write lands in
the kernel at once, so a SIGKILL loses none):

- ``begin <run> <step>``: a step's function was called;
- ``got <run> <step>``: the handler got the step's result back from `run.step` (so it was
  recorded);
- ``approved <run>``: its wait returned the approval;
- ``done <run>``: the run finished.

    python -m tests.conformance.run_worker URL LEDGER
"""

from __future__ import annotations

import asyncio
import os
import sys

from eventwire import Event, EventBus, Run
from tests.conformance.crash_worker import serve


async def main(url: str, ledger: str) -> None:
    fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(line: str) -> None:
        os.write(fd, f"{line}\n".encode())

    bus = EventBus(url, redeliver_after=1.0, close_grace=1.0)

    @bus.subscribe(
        "agent.task", name="agent", durable=True, waits=["agent.approved"], max_restarts=None
    )
    async def agent(event: Event[int], run: Run) -> None:
        task = event.payload

        def model(step: str) -> object:
            async def call(prompt: str) -> str:
                write(f"begin {task} {step}")
                await asyncio.sleep(0.01)  # the model thinking: kills land mid-call too
                return f"{step}({prompt})"

            return call

        async def step(name: str, prompt: str) -> str:
            result: str = await run.step(name, model(name), prompt)
            write(f"got {task} {name}")
            return result

        plan = await step("plan", str(task))
        found = await run.gather(step("search-a", plan), step("search-b", plan))
        draft = await step("draft", " ".join(found))
        await step("review", draft)
        approval = await run.wait_for("agent.approved", match={"task": task}, timeout=300)
        if approval is None:
            raise RuntimeError(f"task {task}: no approval came")
        write(f"approved {task}")

        async def send_email(body: str) -> str:
            write(f"begin {task} email")
            return f"sent {len(body)}"

        await run.effect("email", send_email, draft)
        write(f"got {task} email")
        write(f"done {task}")

    await serve(bus)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
