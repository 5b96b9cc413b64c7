"""Durable agents side by side: eventwire and its peers, on SQLite, with a fake model.

Usage (from the repository root; no network, no broker)::

    .venv/bin/python bench/bench_durable_peers.py [--runs 200] [--warmup 20] [--reps 3]
        [--markdown FILE]

The same agent is written for each framework (eventwire, LangGraph with its SQLite
checkpointer, DBOS with a SQLite system database, LlamaIndex Workflows): three model calls
(plan, draft, review) to a deterministic fake model (a hash of the prompt, 12 words, no
delay), two searches run in parallel between plan and draft, and an email effect (appended
to a list). Every function returns at once, so the time measured is the framework's.
Measured, per framework, in one run of this script:

- runs per second, one run at a time (each awaited before the next), median of `--reps`
  repetitions of `--runs` runs after `--warmup` runs; the repetitions go round robin
  over the frameworks so that noise falls on all of them;
- the time added per step: (time per run - time per run of the six functions called
  plainly) / 6;
- the time to resume after a kill: a worker process (``--worker FRAMEWORK DIR``) runs the
  agent until the review call, which blocks; it is SIGKILLed there, and a fresh process
  (``--recover FRAMEWORK DIR``) times from opening the framework until the run is done,
  while a file written by every call tells whether a finished step was called again;
- the database size after one run of 100 model calls whose prompt is the whole
  conversation so far (``--size FRAMEWORK DIR``, in its own process).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import json
import operator
import os
import platform
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Annotated, Any, TypedDict

from workflows import Context, Workflow, step
from workflows.events import Event as LEvent
from workflows.events import StartEvent, StopEvent

REPO_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_DIR))

from eventwire import Event, EventBus, Retry, Run  # noqa: E402
from eventwire.models import Completion, FakeModel  # noqa: E402

FRAMEWORKS = ["eventwire", "langgraph", "dbos", "llamaindex"]
STEPS = 6
TURNS = 100
REDELIVER_AFTER = 0.5
CALLS_FILE = os.environ.get("BENCH_CALLS_FILE")
BLOCK_REVIEW = os.environ.get("BENCH_BLOCK_REVIEW") == "1"
SENT: list[str] = []


# -- the agent's functions, shared by every framework ---------------------------------------


def note(name: str) -> None:
    """Count a call in the calls file (worker and recovery processes only)."""
    if CALLS_FILE:
        with open(CALLS_FILE, "a") as file:
            file.write(name + "\n")


async def maybe_block(prompt: str) -> None:
    if BLOCK_REVIEW and prompt.startswith("review"):
        print("READY", flush=True)
        await asyncio.sleep(3600)


def fake_answer(prompt: str, words: int = 12) -> str:
    out: list[str] = []
    digest = prompt.encode()
    while len(out) < words:
        digest = hashlib.sha256(digest).hexdigest().encode()
        out.extend(digest[i : i + 6].decode() for i in range(0, 60, 6))
    return " ".join(out[:words])


async def peer_model(prompt: str) -> str:
    """The peers' fake model: an async call answering 12 words made from the prompt."""
    note(prompt.split(" ", 1)[0])
    await maybe_block(prompt)
    return fake_answer(prompt)


class CountingModel(FakeModel):
    """eventwire's FakeModel, counting its calls in the calls file (and blocking on review
    in the worker)."""

    async def complete(self, prompt: Any, **options: Any) -> Completion:
        note(str(prompt).split(" ", 1)[0])
        await maybe_block(str(prompt))
        return await super().complete(prompt, **options)


MODEL = CountingModel("fake", words=12)


def search(tag: str, text: str) -> str:
    note(f"search-{tag}")
    return f"{tag}:{text[:24]}"


def send_email(text: str) -> str:
    note("email")
    SENT.append(text)
    return "sent"


async def plain_run(topic: int) -> str:
    plan = await peer_model(f"plan {topic}")

    async def one(tag: str) -> str:
        return search(tag, plan)

    a, b = await asyncio.gather(one("a"), one("b"))
    draft = await peer_model(f"draft {a} {b}")
    review = await peer_model(f"review {draft}")
    return send_email(review)


def db_bytes(folder: Path, name: str) -> int:
    """The size of SQLite database `name` in `folder` with its -wal and -shm files."""
    return sum(
        (folder / f"{name}{suffix}").stat().st_size
        for suffix in ("", "-wal", "-shm", "-journal")
        if (folder / f"{name}{suffix}").exists()
    )


# -- eventwire --------------------------------------------------------------------------------


class Eventwire:
    note = (
        "durable subscription, one bus.request per run (returns when the run ends); "
        "journal file bus.db-runs; WAL, synchronous=FULL"
    )

    def __init__(self, folder: Path, redeliver_after: float = 30.0) -> None:
        self.url = f"sqlite:///{folder}/bus.db"
        self.redeliver_after = redeliver_after
        self.done = 0
        self.finished = asyncio.Event()

    async def agent(self, event: Event[int], run: Run) -> str:
        plan = await run.complete("plan", MODEL, f"plan {event.payload}")
        a, b = await run.gather(
            run.step("search-a", search, "a", plan.text),
            run.step("search-b", search, "b", plan.text),
        )
        draft = await run.complete("draft", MODEL, f"draft {a} {b}")
        review = await run.complete("review", MODEL, f"review {draft.text}")
        await run.effect("email", send_email, review.text)
        self.done += 1
        self.finished.set()
        return review.text

    async def open(self) -> None:
        self.bus = EventBus(self.url, redeliver_after=self.redeliver_after)
        await self.bus.__aenter__()
        sub = self.bus.subscribe(
            "task",
            self.agent,
            durable=True,
            name="agent",
            concurrency=1,
            retry=Retry(attempts=3, backoff=0.0),
        )
        await sub.ready()

    async def run_one(self, topic: int) -> None:
        await self.bus.request("task", topic, timeout=60)

    async def close(self) -> None:
        await self.bus.__aexit__(None, None, None)

    async def worker(self) -> None:
        await self.open()
        await self.bus.publish("task", 1)
        await asyncio.sleep(3600)

    async def recover(self) -> None:
        await self.open()  # no publish: the unacknowledged event comes back
        await self.finished.wait()
        await self.close()

    @staticmethod
    async def size(folder: Path) -> dict[str, int]:
        async def talk(event: Event[int], run: Run) -> None:
            conversation: list[str] = [f"hello {event.payload}"]
            for _ in range(TURNS):
                reply = await run.complete("turn", MODEL, "\n".join(conversation))
                conversation.append(reply.text)

        async with EventBus(f"sqlite:///{folder}/bus.db") as bus:
            sub = bus.subscribe("talk", talk, durable=True, name="talk")
            await sub.ready()
            await bus.publish("talk", 1)
            await bus.drain()
        journal = db_bytes(folder, "bus.db-runs")
        return {"journal": journal, "total": journal + db_bytes(folder, "bus.db")}


# -- LangGraph --------------------------------------------------------------------------------


class AgentState(TypedDict, total=False):
    topic: int
    plan: str
    a: str
    b: str
    draft: str
    review: str
    sent: bool


class TalkState(TypedDict):
    messages: Annotated[list[str], operator.add]


def build_agent_graph() -> Any:
    from langgraph.graph import END, START, StateGraph

    async def plan(state: AgentState) -> AgentState:
        return {"plan": await peer_model(f"plan {state['topic']}")}

    async def search_a(state: AgentState) -> AgentState:
        return {"a": search("a", state["plan"])}

    async def search_b(state: AgentState) -> AgentState:
        return {"b": search("b", state["plan"])}

    async def draft(state: AgentState) -> AgentState:
        return {"draft": await peer_model(f"draft {state['a']} {state['b']}")}

    async def review(state: AgentState) -> AgentState:
        return {"review": await peer_model(f"review {state['draft']}")}

    async def email(state: AgentState) -> AgentState:
        send_email(state["review"])
        return {"sent": True}

    graph = StateGraph(AgentState)
    for node in (plan, search_a, search_b, draft, review, email):
        graph.add_node(node.__name__, node)
    graph.add_edge(START, "plan")
    graph.add_edge("plan", "search_a")
    graph.add_edge("plan", "search_b")
    graph.add_edge(["search_a", "search_b"], "draft")
    graph.add_edge("draft", "review")
    graph.add_edge("review", "email")
    graph.add_edge("email", END)
    return graph


class LangGraph:
    note = (
        "AsyncSqliteSaver (WAL), default durability 'async' (a checkpoint's write overlaps "
        "the next step), one thread_id per run"
    )

    def __init__(self, folder: Path) -> None:
        self.path = str(folder / "lg.db")

    async def open(self) -> None:
        from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

        self.manager = AsyncSqliteSaver.from_conn_string(self.path)
        saver = await self.manager.__aenter__()
        self.graph = build_agent_graph().compile(checkpointer=saver)

    async def run_one(self, topic: int) -> None:
        await self.graph.ainvoke({"topic": topic}, {"configurable": {"thread_id": f"t{topic}"}})

    async def close(self) -> None:
        await self.manager.__aexit__(None, None, None)

    async def worker(self) -> None:
        await self.open()
        await self.run_one(1)

    async def recover(self) -> None:
        await self.open()
        await self.graph.ainvoke(None, {"configurable": {"thread_id": "t1"}})
        await self.close()

    @staticmethod
    async def size(folder: Path) -> dict[str, int]:
        from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
        from langgraph.graph import END, START, StateGraph

        async def turn(state: TalkState) -> TalkState:
            return {"messages": [await peer_model("\n".join(state["messages"]))]}

        def more(state: TalkState) -> str:
            return "turn" if len(state["messages"]) <= TURNS else END

        graph = StateGraph(TalkState)
        graph.add_node("turn", turn)
        graph.add_edge(START, "turn")
        graph.add_conditional_edges("turn", more, ["turn", END])
        async with AsyncSqliteSaver.from_conn_string(str(folder / "lg.db")) as saver:
            app = graph.compile(checkpointer=saver)
            config = {"configurable": {"thread_id": "talk"}, "recursion_limit": 1000}
            await app.ainvoke({"messages": ["hello 1"]}, config)
        total = db_bytes(folder, "lg.db")
        return {"journal": total, "total": total}


# -- DBOS -------------------------------------------------------------------------------------

_dbos_registered: dict[str, Any] = {}


def dbos_functions() -> dict[str, Any]:
    """Register the DBOS workflows and steps once (before DBOS.launch)."""
    if _dbos_registered:
        return _dbos_registered
    from dbos import DBOS

    @DBOS.step()
    async def d_plan(topic: int) -> str:
        return await peer_model(f"plan {topic}")

    @DBOS.step()
    async def d_search_a(text: str) -> str:
        return search("a", text)

    @DBOS.step()
    async def d_search_b(text: str) -> str:
        return search("b", text)

    @DBOS.step()
    async def d_draft(a: str, b: str) -> str:
        return await peer_model(f"draft {a} {b}")

    @DBOS.step()
    async def d_review(draft: str) -> str:
        return await peer_model(f"review {draft}")

    @DBOS.step()
    async def d_email(text: str) -> str:
        return send_email(text)

    @DBOS.workflow()
    async def d_agent(topic: int) -> str:
        plan = await d_plan(topic)
        a, b = await asyncio.gather(d_search_a(plan), d_search_b(plan))
        draft = await d_draft(a, b)
        review = await d_review(draft)
        return await d_email(review)

    @DBOS.step()
    async def d_turn(prompt: str) -> str:
        return await peer_model(prompt)

    @DBOS.workflow()
    async def d_talk(topic: int) -> int:
        conversation = [f"hello {topic}"]
        for _ in range(TURNS):
            conversation.append(await d_turn("\n".join(conversation)))
        return len(conversation)

    _dbos_registered.update(agent=d_agent, talk=d_talk)
    return _dbos_registered


class Dbos:
    note = (
        "async @DBOS.workflow / @DBOS.step, asyncio.gather for the searches; dbos sets no "
        "WAL pragma (SQLite's rollback journal); resume waits for launch's recovery, "
        "which re-enqueues the workflow on an internal queue"
    )

    def __init__(self, folder: Path) -> None:
        self.path = folder / "dbos.sqlite"

    async def open(self) -> None:
        from dbos import DBOS, DBOSConfig

        self.functions = dbos_functions()
        config: DBOSConfig = {
            "name": "bench-peers",
            "system_database_url": f"sqlite:///{self.path}",
            "log_level": "WARNING",
            "run_admin_server": False,
        }
        DBOS(config=config)
        DBOS.launch()

    async def run_one(self, topic: int) -> None:
        from dbos import SetWorkflowID

        with SetWorkflowID(f"w{topic}"):
            await self.functions["agent"](topic)

    async def close(self) -> None:
        from dbos import DBOS

        DBOS.destroy()

    async def worker(self) -> None:
        await self.open()
        await self.run_one(1)

    async def recover(self) -> None:
        from dbos import DBOS

        await self.open()  # launch recovers the pending workflow of this executor
        handle = await DBOS.retrieve_workflow_async("w1")
        await handle.get_result()
        await self.close()

    @staticmethod
    async def size(folder: Path) -> dict[str, int]:
        dbos = Dbos(folder)
        await dbos.open()
        await dbos.functions["talk"](1)
        await dbos.close()
        total = db_bytes(folder, "dbos.sqlite")
        return {"journal": total, "total": total}


# -- LlamaIndex Workflows ---------------------------------------------------------------------


class Planned(LEvent):
    plan: str


class SearchA(LEvent):
    plan: str


class SearchB(LEvent):
    plan: str


class FoundA(LEvent):
    text: str


class FoundB(LEvent):
    text: str


class Drafted(LEvent):
    text: str


class Reviewed(LEvent):
    text: str


class Saved(LEvent):
    step: str


class Turn(LEvent):
    n: int


class LlamaAgent(Workflow):
    @step
    async def plan(self, ctx: Context, ev: StartEvent) -> SearchA | SearchB | None:
        ctx.write_event_to_stream(Saved(step="plan"))
        plan = await peer_model(f"plan {ev.topic}")
        ctx.send_event(SearchA(plan=plan))
        ctx.send_event(SearchB(plan=plan))
        return None

    @step
    async def search_a(self, ctx: Context, ev: SearchA) -> FoundA:
        ctx.write_event_to_stream(Saved(step="search_a"))
        return FoundA(text=search("a", ev.plan))

    @step
    async def search_b(self, ctx: Context, ev: SearchB) -> FoundB:
        ctx.write_event_to_stream(Saved(step="search_b"))
        return FoundB(text=search("b", ev.plan))

    @step
    async def draft(self, ctx: Context, ev: FoundA | FoundB) -> Drafted | None:
        found = ctx.collect_events(ev, [FoundA, FoundB])
        if found is None:
            return None
        ctx.write_event_to_stream(Saved(step="draft"))
        text = await peer_model(f"draft {found[0].text} {found[1].text}")
        return Drafted(text=text)

    @step
    async def review(self, ctx: Context, ev: Drafted) -> Reviewed:
        ctx.write_event_to_stream(Saved(step="review"))
        text = await peer_model(f"review {ev.text}")
        return Reviewed(text=text)

    @step
    async def email(self, ctx: Context, ev: Reviewed) -> StopEvent:
        ctx.write_event_to_stream(Saved(step="email"))
        return StopEvent(result=send_email(ev.text))


class LlamaTalk(Workflow):
    @step
    async def start(self, ctx: Context, ev: StartEvent) -> Turn:
        await ctx.store.set("messages", [f"hello {ev.topic}"])
        return Turn(n=0)

    @step
    async def turn(self, ctx: Context, ev: Turn) -> Turn | StopEvent:
        ctx.write_event_to_stream(Saved(step="turn"))
        messages = await ctx.store.get("messages")
        messages = [*messages, await peer_model("\n".join(messages))]
        await ctx.store.set("messages", messages)
        if ev.n + 1 >= TURNS:
            return StopEvent(result=len(messages))
        return Turn(n=ev.n + 1)


class SnapshotStore:
    """Where the LlamaIndex runs' snapshots go: `Context.to_dict()` as JSON, one row per run
    (replaced at each snapshot) in a SQLite table. The workflows package has no durable
    store of its own (its SqliteWorkflowStore is in the separate llama-agents-server)."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("pragma journal_mode=wal")
        self.db.execute("create table if not exists snapshots (run text primary key, ctx text)")

    def save(self, run: str, ctx: Any) -> None:
        self.db.execute(
            "insert or replace into snapshots values (?, ?)", (run, json.dumps(ctx.to_dict()))
        )

    def load(self, run: str) -> dict[str, Any]:
        row = self.db.execute("select ctx from snapshots where run = ?", (run,)).fetchone()
        return json.loads(row[0])

    def close(self) -> None:
        self.db.execute("pragma wal_checkpoint(truncate)")
        self.db.close()


async def llama_run(store: SnapshotStore, run: str, handler: Any) -> Any:
    """Await a LlamaIndex handler, snapshotting its context at each step's start (a stream
    event, saved when this consumer gets it) and at the end."""
    async for _ in handler.stream_events():
        store.save(run, handler.ctx)
    result = await handler
    store.save(run, handler.ctx)
    return result


class Llama:
    note = (
        "no durable store in the package: ctx.to_dict() snapshot saved to SQLite by this "
        "script at each step's start (a stream event)"
    )

    def __init__(self, folder: Path) -> None:
        self.path = folder / "llama.db"

    async def open(self) -> None:
        self.workflow = LlamaAgent(timeout=None)
        self.store = SnapshotStore(self.path)

    async def run_one(self, topic: int) -> None:
        await llama_run(self.store, f"r{topic}", self.workflow.run(topic=topic))

    async def close(self) -> None:
        self.store.close()

    async def worker(self) -> None:
        await self.open()
        await self.run_one(1)

    async def recover(self) -> None:
        await self.open()
        ctx = Context.from_dict(self.workflow, self.store.load("r1"))
        await llama_run(self.store, "r1", self.workflow.run(ctx=ctx))
        await self.close()

    @staticmethod
    async def size(folder: Path) -> dict[str, int]:
        workflow = LlamaTalk(timeout=None)
        store = SnapshotStore(folder / "llama.db")
        await llama_run(store, "talk", workflow.run(topic=1))
        store.close()
        total = db_bytes(folder, "llama.db")
        return {"journal": total, "total": total}


CLASSES: dict[str, Any] = {
    "eventwire": Eventwire,
    "langgraph": LangGraph,
    "dbos": Dbos,
    "llamaindex": Llama,
}


def make(name: str, folder: Path) -> Any:
    if name == "eventwire":
        return Eventwire(folder, redeliver_after=REDELIVER_AFTER)
    return CLASSES[name](folder)


# -- the measurements -------------------------------------------------------------------------


async def timed(run_one: Any, start: int, count: int) -> float:
    began = time.perf_counter()
    for topic in range(start, start + count):
        await run_one(topic)
    return (time.perf_counter() - began) / count


async def throughput(args: argparse.Namespace, root: Path) -> dict[str, list[float]]:
    """Seconds per run, per framework and repetition (plus the plain functions)."""
    per_run: dict[str, list[float]] = {name: [] for name in ["plain", *FRAMEWORKS]}
    opened: dict[str, Any] = {}
    for name in FRAMEWORKS:
        folder = root / f"tp-{name}"
        folder.mkdir()
        opened[name] = make(name, folder)
        await opened[name].open()
    try:
        next_topic = 1
        for name in ["plain", *FRAMEWORKS]:
            run_one = plain_run if name == "plain" else opened[name].run_one
            await timed(run_one, next_topic, args.warmup)
            next_topic += args.warmup
        for rep in range(args.reps):
            for name in ["plain", *FRAMEWORKS]:
                run_one = plain_run if name == "plain" else opened[name].run_one
                per_run[name].append(await timed(run_one, next_topic, args.runs))
                next_topic += args.runs
                print(
                    f"  rep {rep + 1} {name}: {1 / per_run[name][-1]:.0f} runs/s",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        for name in FRAMEWORKS:
            await opened[name].close()
    return per_run


def subprocess_json(mode: str, name: str, folder: Path, env: dict[str, str]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, mode, name, str(folder)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
        cwd=REPO_DIR,
    )
    sys.stderr.write(done.stderr if mode == "--throughput" else "")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{mode} {name} failed: {done.stderr.strip()[-600:]}")
    return json.loads(lines[-1])


def kill_and_resume(name: str, root: Path) -> dict[str, Any]:
    folder = root / f"kill-{name}"
    folder.mkdir()
    calls = folder / "calls.txt"
    env = {**os.environ, "BENCH_CALLS_FILE": str(calls), "BENCH_BLOCK_REVIEW": "1"}
    worker = subprocess.Popen(
        [sys.executable, __file__, "--worker", name, str(folder)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=REPO_DIR,
    )
    try:
        assert worker.stdout is not None
        for line in worker.stdout:
            if line.strip() == "READY":
                break
        else:
            raise RuntimeError(f"{name} worker ended before the review call")
        time.sleep(REDELIVER_AFTER)  # let writes in flight land (LangGraph's are async)
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    before = collections.Counter(calls.read_text().split())
    env["BENCH_BLOCK_REVIEW"] = "0"
    began = time.perf_counter()
    result = subprocess_json("--recover", name, folder, env)
    result["wall_s"] = time.perf_counter() - began
    after = collections.Counter(calls.read_text().split())
    result["again"] = sorted(
        step
        for step in ("plan", "search-a", "search-b", "draft")
        if after[step] > before[step] or after[step] == 0
    )
    result["completed"] = after["email"] == 1 and after["review"] == 2
    return result


async def child(mode: str, name: str, folder: Path) -> None:
    if mode == "--worker":
        await make(name, folder).worker()
    elif mode == "--recover":
        framework = make(name, folder)
        began = time.perf_counter()
        await framework.recover()
        print(json.dumps({"seconds": time.perf_counter() - began}), flush=True)
    elif mode == "--throughput":
        runs, warmup, reps = (int(number) for number in name.split(","))
        sizes = argparse.Namespace(runs=runs, warmup=warmup, reps=reps)
        print(json.dumps(await throughput(sizes, folder)), flush=True)
    else:
        print(json.dumps(await CLASSES[name].size(folder)), flush=True)


def versions() -> str:
    names = ["langgraph", "langgraph-checkpoint-sqlite", "dbos", "llama-index-workflows"]
    return ", ".join(f"{name} {version(name)}" for name in names)


def places() -> list[tuple[str, str]]:
    """Where the throughput is measured: the temporary folder's disk, and tmpfs if any."""
    found = [("disk", tempfile.gettempdir())]
    if Path("/dev/shm").is_dir():
        found.append(("tmpfs", "/dev/shm"))
    return found


def fsync_ms() -> float:
    """How long one small write + fsync takes in the temporary folder."""
    with tempfile.NamedTemporaryFile() as file:
        began = time.perf_counter()
        for _ in range(50):
            file.write(b"x" * 100)
            file.flush()
            os.fsync(file.fileno())
        return (time.perf_counter() - began) / 50 * 1e3


def ratio(mine: float, theirs: float) -> str:
    return f"{mine / theirs:.1f}x" if theirs else "-"


async def main(args: argparse.Namespace) -> str:
    with tempfile.TemporaryDirectory(prefix="peers-") as temp:
        root = Path(temp)
        per_place: dict[str, dict[str, list[float]]] = {}
        env = dict(os.environ)
        for place, where in places():
            print(f"throughput on {place} ({where}) ...", file=sys.stderr, flush=True)
            with tempfile.TemporaryDirectory(prefix="peers-", dir=where) as folder:
                sizes = f"{args.runs},{args.warmup},{args.reps}"  # in a process of its own
                per_place[place] = subprocess_json("--throughput", sizes, Path(folder), env)
        resume: dict[str, Any] = {}
        size: dict[str, Any] = {}
        for name in FRAMEWORKS:
            print(f"kill and resume, size: {name} ...", file=sys.stderr, flush=True)
            try:
                resume[name] = kill_and_resume(name, root)
            except Exception as error:  # reported in the table, not hidden
                resume[name] = {"error": str(error).splitlines()[-1][:160]}
            folder = root / f"size-{name}"
            folder.mkdir()
            try:
                size[name] = subprocess_json("--size", name, folder, dict(os.environ))
            except Exception as error:
                size[name] = {"error": str(error).splitlines()[-1][:160]}

    rows, notes = [], []
    plain, rate, added = {}, {}, {}
    for place, per_run in per_place.items():
        plain[place] = statistics.median(per_run["plain"])
        rate[place] = {name: 1 / statistics.median(per_run[name]) for name in FRAMEWORKS}
        added[place] = {
            name: (statistics.median(per_run[name]) - plain[place]) / STEPS * 1e6
            for name in FRAMEWORKS
        }
    shown = list(per_place)
    for name in FRAMEWORKS:
        r = resume[name]
        if "error" in r:
            resumed = "not measured"
            notes.append(f"- {name}: resume failed: {r['error']}")
        else:
            again = ", ".join(r["again"]) or "none"
            resumed = f"{r['seconds']:.2f}"
            notes.append(
                f"- {name}: resume {r['seconds']:.3f} s in the recovering process "
                f"({r['wall_s']:.2f} s with interpreter start and imports); finished steps "
                f"called again: {again}; run completed: {r['completed']}"
            )
        s = size[name]
        if "error" in s:
            sized = "not measured"
            notes.append(f"- {name}: size failed: {s['error']}")
        elif s["journal"] != s["total"]:
            sized = f"{s['total'] / 1024:.0f} (journal {s['journal'] / 1024:.0f})"
        else:
            sized = f"{s['total'] / 1024:.0f}"
        rows.append(
            f"| {name} | {' / '.join(f'{rate[p][name]:,.0f}' for p in shown)} | "
            f"{' / '.join(f'{added[p][name]:,.0f}' for p in shown)} | {resumed} | {sized} | "
            f"{CLASSES[name].note} |"
        )
    ew = "eventwire"
    compare = " ".join(
        f"On {place}: "
        + "; ".join(
            f"vs {name} {ratio(rate[place][ew], rate[place][name])} its runs/s "
            f"(its added time per step is {ratio(added[place][name], added[place][ew])} "
            "eventwire's)"
            for name in FRAMEWORKS[1:]
        )
        + "."
        for place in shown
    )
    return "\n".join(
        [
            "## Durable agents side by side (SQLite, fake model)",
            "",
            f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, Python "
            f"{platform.python_version()} (a shared 2-core machine: other work may have run "
            "at the same time). eventwire: this repo; "
            f"{versions()}.",
            "",
            "Reproduce: `.venv/bin/python bench/bench_durable_peers.py --markdown FILE` "
            f"(--runs {args.runs} --warmup {args.warmup} --reps {args.reps}).",
            "",
            "Agent: plan (model), two searches in parallel, draft (model), review (model), "
            "email (effect); instant functions, so the times are the frameworks' own. "
            f"Runs/s: one run at a time, median of {args.reps} x {args.runs} runs; added "
            "µs/step: (time per run - time per run of the plain functions, "
            + ", ".join(f"{plain[p] * 1e6:.0f} µs on {p}" for p in shown)
            + ") / 6. Both are measured on "
            + " and on ".join(f"{p} ({where})" for p, where in places())
            + f", shown as {' / '.join(shown)}: on disk SQLite's fsync per commit dominates "
            f"(one fsync here: {fsync_ms():.1f} ms), on tmpfs the frameworks' CPU time shows. "
            "Resume and size: on disk. "
            "Resume: worker SIGKILLed while the review call blocks, then a fresh process "
            f"times from opening the framework until the run is done (eventwire: "
            f"redeliver_after={REDELIVER_AFTER} s in both processes). Size: SQLite files "
            f"(db + -wal + -shm) after one run of {TURNS} model calls, each prompt the whole "
            "conversation so far.",
            "",
            f"| framework | runs/s (one at a time; {' / '.join(shown)}) | added µs/step "
            f"({' / '.join(shown)}) | resume after kill (s) | "
            f"size after {TURNS} calls (KB) | notes |",
            "|---|---:|---:|---:|---:|---|",
            *rows,
            "",
            f"eventwire: {compare}",
            "",
            *notes,
            "",
        ]
    )


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] in ("--worker", "--recover", "--size", "--throughput"):
        asyncio.run(child(sys.argv[1], sys.argv[2], Path(sys.argv[3])))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--markdown", type=Path)
    arguments = parser.parse_args()
    report = asyncio.run(main(arguments))
    print(report)
    if arguments.markdown:
        arguments.markdown.write_text(report)
