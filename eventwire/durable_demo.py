"""The durable-agent demo (``eventwire demo --durable``): the tutorial's research and email
agents as one durable run, on SQLite, offline, killed in the middle and started again.

The run plans with a (fake, offline) model, searches three sources at once, drafts an
answer with the model, waits for a person's approval, and sends the email exactly once. The
demo runs the agent in a worker process, kills it (SIGKILL) while the draft is being
written, starts a new worker, approves the draft from outside as ``eventwire approve``
would, and shows what each process did: the second one replays what the first one recorded
instead of paying for the model again, and the email goes out once.

Run it with ``eventwire demo --durable``; the worker is ``python -m eventwire.durable_demo``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from eventwire.agent import Agent, on
from eventwire.backends.journal import Journal
from eventwire.bus import EventBus
from eventwire.event import Event
from eventwire.models import Completion, FakeModel, Prompt
from eventwire.runs import Run, RunInfo, list_runs, pending_waits

__all__ = ["Researcher", "run_durable_demo"]

QUERY = "Which product line grew fastest this quarter?"
SOURCES = ("sales warehouse", "CRM notes", "analyst reports")
DRAFT_SECONDS = 2.0
"""How long the model takes to write the draft: the worker is killed in the middle of it."""
_STEP_TIMEOUT = 30.0
REDELIVER_AFTER = 1.0


def _say(*parts: object) -> None:
    """One line to the demo (the worker's standard output, read by the demo process)."""
    print(*parts, flush=True)


class _NarratedModel(FakeModel):
    """The fake model, saying when it is called (what a real model would charge for)."""

    async def complete(self, prompt: Prompt, **options: Any) -> Completion:
        _say(f"model: {str(prompt).split()[0]} (a paid call)")
        return await super().complete(prompt, **options)


class Researcher(Agent):
    """Answers a query by email, durably: each step is journaled, the approval is a wait."""

    def __init__(self, ledger: Path) -> None:
        super().__init__(name="researcher")
        self.ledger = ledger
        self.model = _NarratedModel("fake-gpt", words=24)
        self.slow_model = _NarratedModel("fake-gpt", words=60, delay=DRAFT_SECONDS)

    @on("user.query", durable=True, waits=["approval.given"], publishes=["approval.requested"])
    async def handle(self, event: Event[dict[str, str]], run: Run) -> str:
        run.budget(cost=1.0)
        _say(f"run {run.id}: try {run.tries}")
        query = event.payload["query"]
        plan = await run.complete("plan", self.model, f"plan research for: {query}")
        results = await run.gather(
            *(run.step(f"search:{source}", self._search, source, plan.text) for source in SOURCES)
        )
        draft = await run.complete("draft", self.slow_model, f"draft {query} from {results}")
        await run.step("ask", self._ask_approval, run.id, draft.text)
        approval = await run.wait_for("approval.given", match={"run": run.id}, timeout=3600)
        if approval is None or not approval.payload.get("approved"):
            _say("not approved: no email")
            return "not approved"
        await run.effect("email", self._send_email, event.payload["user"], draft.text, run)
        _say(f"done: {run.calls} calls made here, {run.replays} taken from the journal")
        return "sent"

    async def _search(self, source: str, plan: str) -> str:
        _say(f"step search:{source}: searching")
        await asyncio.sleep(0.05)
        return f"{len(plan.split())} facts from the {source}"

    async def _ask_approval(self, run: str, draft: str) -> None:
        _say("step ask: asking for approval")
        await self.publish("approval.requested", {"run": run, "draft": draft[:60]})

    def _send_email(self, user: str, draft: str, run: Run) -> str:
        with self.ledger.open("a") as ledger:
            ledger.write(f"{run.idempotency_key('email')} to {user}\n")
        _say(f"effect email: sent to {user}")
        return "sent"


async def _runs(journal: Journal) -> dict[str, RunInfo]:
    return {info.id: info for info in await list_runs(journal)}


async def _work(url: str, ledger: Path) -> None:
    """A worker process: the researcher on the bus at `url` until killed."""
    # A killed worker's event comes back to the next one after `redeliver_after`.
    async with EventBus(url, redeliver_after=REDELIVER_AFTER) as bus:
        bus.register(Researcher(ledger))
        for subscription in bus.subscriptions.values():
            await subscription.ready()
        _say("worker ready")
        await asyncio.Event().wait()


class _Worker:
    """A worker process and the lines it prints."""

    def __init__(self, number: int, url: str, ledger: Path, out: Console) -> None:
        self.number = number
        self.url = url
        self.ledger = ledger
        self.out = out
        self.lines: list[str] = []
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._seen = asyncio.Condition()

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "eventwire.durable_demo",
            self.url,
            str(self.ledger),
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self._reader = asyncio.get_running_loop().create_task(self._read())
        await self.seen("worker ready")

    async def _read(self) -> None:
        assert self.process is not None
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            line = raw.decode().rstrip()
            self.out.print(f"  [cyan]worker {self.number}[/cyan] {line}")
            async with self._seen:
                self.lines.append(line)
                self._seen.notify_all()

    async def seen(self, text: str) -> None:
        """Wait until the worker printed a line containing `text`."""
        async with asyncio.timeout(_STEP_TIMEOUT), self._seen:
            await self._seen.wait_for(lambda: any(text in line for line in self.lines))

    def count(self, text: str) -> int:
        return sum(text in line for line in self.lines)

    async def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()
        if self._reader is not None:
            await self._reader

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await self.process.wait()
            if self.process.returncode is None:
                await self.kill()
        if self._reader is not None:
            await self._reader


async def run_durable_demo(out: Console, *, url: str | None = None) -> dict[str, Any]:
    """Tell the durable story (see the module's docstring); returns its figures."""
    with tempfile.TemporaryDirectory(prefix="eventwire-durable-demo-") as folder:
        url = url or f"sqlite:///{Path(folder) / 'demo.db'}"
        ledger = Path(folder) / "sent-emails.txt"
        ledger.touch()
        out.print("[bold]Durable agents: a run that survives a crash[/bold]")
        out.print(f"bus: {url} (nothing to install, nothing to start)")
        first = _Worker(1, url, ledger, out)
        second = _Worker(2, url, ledger, out)
        try:
            await first.start()
            async with EventBus(url) as bus:
                query = await bus.publish("user.query", {"query": QUERY, "user": "ana@example.com"})
                run = f"researcher.handle/{query.id}"
                out.print(f"[bold]published[/bold] user.query {query.id}")
                await first.seen("model: draft")
                out.print("[bold red]killing worker 1 (SIGKILL) while the model writes[/]")
                await first.kill()
                await second.start()
                await second.seen("step ask: asking for approval")
                journal = bus.backend.journal()
                async with asyncio.timeout(_STEP_TIMEOUT):
                    while not await pending_waits(journal, run):  # noqa: ASYNC110 - journal state
                        await asyncio.sleep(0.05)
                out.print("[bold]the run is parked[/bold]: no process holds it while it waits")
                out.print("[bold green]a person approves[/] (as `eventwire approve` does)")
                await bus.publish("approval.given", {"run": run, "approved": True, "by": "ana"})
                await second.seen("done:")
                async with asyncio.timeout(_STEP_TIMEOUT):
                    # "done" is printed as the handler returns; "finished" is recorded after.
                    while (infos := await _runs(journal))[run].state != "finished":  # noqa: ASYNC110 - journal state
                        await asyncio.sleep(0.05)
        finally:
            await first.stop()
            await second.stop()
        info = infos[run]
        emails = ledger.read_text().splitlines()
        figures = {
            "plan calls": first.count("model: plan") + second.count("model: plan"),
            "search calls": first.count("step search:") + second.count("step search:"),
            "draft calls": first.count("model: draft") + second.count("model: draft"),
            "emails sent": len(emails),
            "state": info.state,
            "tries": info.tries,
        }
        table = Table(title="What happened", show_edge=False)
        table.add_column("")
        table.add_column("worker 1 (killed)", justify="right")
        table.add_column("worker 2", justify="right")
        for label, text in (
            ("model: plan", "model: plan"),
            ("searches", "step search:"),
            ("model: draft", "model: draft"),
            ("emails", "effect email"),
        ):
            table.add_row(label, str(first.count(text)), str(second.count(text)))
        out.print(table)
        out.print(
            f"run {info.state} after {info.tries} tries; steps: "
            + ", ".join(step.partition(":")[2] for step in info.steps)
        )
        out.print(
            "worker 2 replayed the plan and the searches from the journal; the draft was in "
            "flight when worker 1 died, so it ran again; the email went out once."
        )
        return figures


def _main() -> None:
    url, ledger = sys.argv[1], Path(sys.argv[2])
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_work(url, ledger))


if __name__ == "__main__":
    _main()
