"""One process's session on a durable consumer: the one consume loop of eventwire.

The subscriptions' feeder (`eventwire.backends.broker.Feeder`) and every tool that reads a
broker (dead letters, history, ``eventwire tail``, stats) use a `ConsumerSession` on the
`Consumer` they opened, rather than a fetch loop of their own. It fetches (retrying with
`Backoff` through errors, when asked to), holds deliveries with their leases kept alive,
acknowledges them (at once or batched) or gives them back, and stops on a flag as well as on
a cancellation: a broker's client library may swallow a cancellation that races with its own
timeout, and a loop that only waited for one would then never end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any

from eventwire.backends.base import Backoff, Consumer, ConsumerSpec, Delivery

logger = logging.getLogger("eventwire")

# How long closing waits to hand held deliveries back to the broker.
GIVE_BACK_TIMEOUT = 5.0
# Leases are extended this many times per `ack_wait`, and never more often than every
# `_SHORTEST_LEASE_PAUSE` seconds.
_EXTENDS_PER_ACK_WAIT = 3
_SHORTEST_LEASE_PAUSE = 0.05
# A held delivery's lease counts as lost once this share of `ack_wait` passed since it was
# last known renewed (fetched, or extended): it may have run out at the broker, and another
# process may hold the delivery now. The rest of `ack_wait` covers the time between the broker
# starting a lease and this process seeing it. Extends renew every third of `ack_wait`, so
# only a process that stopped for half of it (frozen, suspended, its loop blocked) gets here.
_LEASE_TRUSTED = 5 / 6
# Time that goes on while the process is stopped (SIGSTOP) or the machine sleeps, as leases
# at the broker do: CLOCK_BOOTTIME where there is one (Linux), else the monotonic clock.
_BOOTTIME = getattr(time, "CLOCK_BOOTTIME", None)


def _clock() -> float:
    return time.monotonic() if _BOOTTIME is None else time.clock_gettime(_BOOTTIME)


class _Held:
    """One delivery held, and when its lease was last known renewed (`_clock`)."""

    __slots__ = ("delivery", "key", "renewed")

    def __init__(self, key: object, delivery: Delivery, renewed: float) -> None:
        self.key = key
        self.delivery = delivery
        self.renewed = renewed


class ConsumerSession:
    """Fetch, hold, acknowledge and give back the deliveries of one opened `Consumer`.

    - `fetch` / `batches`: deliveries, until `stop`. With ``retry=True`` an error of the
      broker is logged and the fetch tried again after a growing pause (`Backoff`); otherwise
      it is raised. What a fetch brings after `stop` is given back at once.
    - `hold` / `release`: deliveries kept under a key (the event made of it, or the delivery
      itself) while this process works on them; their leases are extended every third of
      ``spec.ack_wait`` until they are released, acknowledged or given back. `lease_alive`
      tells whether one's lease may have run out meanwhile (the process was stopped past
      it): such a lease is not extended any more, and its delivery must not be worked on.
    - `ack` (now, raising) and `ack_later` (batched, retried until it succeeds: unacknowledged
      work is delivered again, never lost); `give_back` returns one held delivery.
    - `run` runs a loop in a task that `stop_running` ends, by flag and cancellation both.
    - `close`: stop, acknowledge what is pending, give back what is held, close the consumer.
    """

    def __init__(
        self,
        consumer: Consumer,
        spec: ConsumerSpec,
        *,
        retry: bool = True,
        give_back_on_close: bool = True,
    ) -> None:
        self.consumer = consumer
        self.spec = spec
        self.retry = retry
        # False: what is held at close goes back with the consumer's own close, which keeps
        # the broker's order (explicit give-backs may be requeued in another order).
        self.give_back_on_close = give_back_on_close
        self._stopped = False
        self._backoff = Backoff()
        # id(key) -> what this process holds, leases kept alive.
        self._held: dict[int, _Held] = {}
        # `_clock` when the last fetch returned: its leases started no earlier than its call.
        self._fetched_at = 0.0
        self._lease_trusted = spec.ack_wait * _LEASE_TRUSTED
        self._leaser: asyncio.Task[None] | None = None
        self._closed = False
        self._acks: list[Delivery] = []
        self._handled_ids: list[str] = []
        # Ids handled here whose record the broker has not confirmed yet (being sent, or
        # owed to the next ack): a redelivery of one is skipped before the broker knows.
        self._unrecorded: set[str] = set()
        self._acker: asyncio.Task[None] | None = None
        self._acker_called = False
        self._runner: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def stopped(self) -> bool:
        """True once `stop` was called (until `resume`): fetching returns nothing more."""
        return self._stopped

    @property
    def held(self) -> int:
        """How many deliveries this session holds."""
        return len(self._held)

    # -- fetching -------------------------------------------------------------------------

    def stop(self) -> None:
        """Fetch nothing more: `fetch` returns ``[]``, `batches` ends, at their next turn."""
        self._stopped = True

    def resume(self) -> None:
        """Fetch again after `stop`."""
        self._stopped = False

    async def fetch(self, limit: int, wait: float, *, with_acks: bool = True) -> list[Delivery]:
        """Up to `limit` deliveries, waiting up to `wait` seconds for the first; ``[]`` if
        none came or the session is stopped. They are not held: `hold` what is kept.
        `with_acks`: pending acknowledgements may go along (`Consumer.ack_and_fetch`)."""
        while not self._stopped:
            acks = self._acks_to_send_along() if with_acks else []
            try:
                deliveries = await self.consumer.ack_and_fetch(acks, limit, wait)
                self._fetched_at = _clock()
            except BaseException as error:
                # Sent on their own now (acknowledging again is harmless).
                self._acks[:0] = acks
                if acks:
                    self._start_acker()
                if not isinstance(error, Exception):
                    raise
                if not self.retry:
                    raise
                logger.warning(
                    "eventwire: fetching for %s failed; retrying in %.1fs",
                    self.name,
                    self._backoff.pause,
                    exc_info=True,
                )
                await self._backoff.wait()
                continue
            self._backoff.reset()
            if self._stopped and deliveries:
                await self.give_back_now(deliveries)
                return []
            return deliveries
        return []

    async def batches(
        self, limit: int | Callable[[], int], wait: float
    ) -> AsyncIterator[list[Delivery]]:
        """Each non-empty batch fetched (of up to `limit` deliveries, or as many as
        ``limit()`` says before each fetch), until `stop`."""
        while not self._stopped:
            deliveries = await self.fetch(limit if isinstance(limit, int) else limit(), wait)
            if deliveries:
                yield deliveries

    def run(self, loop: Callable[[], Coroutine[Any, Any, None]], *, name: str) -> None:
        """Run `loop()` (which should end once `stopped`) in a task, until `stop_running`."""
        if self._runner is not None:
            return
        self._stopped = False
        self._runner = asyncio.get_running_loop().create_task(loop(), name=name)

    async def stop_running(self) -> None:
        """`stop`, cancel the task of `run` and wait for it to end. A client library may
        swallow a cancellation that races with its own timeout: the loop then ends at its
        next turn, when it sees the session stopped."""
        self.stop()
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.cancel()
            await asyncio.wait([runner])
            if not runner.cancelled() and runner.exception() is not None:
                logger.error("eventwire: %s failed", runner.get_name(), exc_info=runner.exception())
        try:
            await self.consumer.stop_fetching()
        except Exception:
            logger.warning("eventwire: stopping the fetches of %s failed", self.name, exc_info=True)

    # -- holding --------------------------------------------------------------------------

    def hold(self, key: object, delivery: Delivery) -> None:
        """Keep `delivery` (of the last fetch) under `key` (compared by identity), its lease
        alive, until it is released, acknowledged or given back."""
        fetched = self._fetched_at or _clock()
        self._held[id(key)] = _Held(key, delivery, fetched - delivery.age)
        if self._leaser is None and not self._closed:
            self._leaser = asyncio.get_running_loop().create_task(
                self._keep_leases(), name=f"eventwire:{self.name}:leases"
            )

    def release(self, key: object) -> Delivery | None:
        """Stop holding what `key` holds, and return it (None if nothing)."""
        held = self._held.pop(id(key), None)
        return None if held is None else held.delivery

    def holding(self) -> list[Delivery]:
        """The deliveries held now."""
        return [held.delivery for held in self._held.values()]

    def is_held(self, key: object) -> bool:
        """Whether something is held under `key`."""
        return id(key) in self._held

    def lease_alive(self, key: object) -> Delivery | None:
        """The delivery held under `key` if it is surely still leased to this process
        (renewed recently enough); None if its lease may have run out, or nothing is held
        under it. The check before working on a delivery: one clock reading."""
        held = self._held.get(id(key))
        if held is not None and _clock() - held.renewed < self._lease_trusted:
            return held.delivery
        return None

    def lost(self) -> list[tuple[object, Delivery]]:
        """The keys and deliveries held whose lease may have run out (`lease_alive`)."""
        oldest = _clock() - self._lease_trusted
        return [(h.key, h.delivery) for h in self._held.values() if h.renewed <= oldest]

    def held_items(self) -> list[tuple[object, Delivery]]:
        """The keys and deliveries held now."""
        return [(held.key, held.delivery) for held in self._held.values()]

    async def _keep_leases(self) -> None:
        every = max(self.spec.ack_wait / _EXTENDS_PER_ACK_WAIT, _SHORTEST_LEASE_PAUSE)
        # Also a flag: the broker's client may swallow a cancellation racing its own timeout.
        while not self._closed:
            await asyncio.sleep(every)
            if self._held and not self._closed:
                # Renewed as of now if the extend succeeds: the broker restarts each lease no
                # earlier than this. A lease that may have run out already is not extended:
                # another process may hold its delivery (an extend cannot tell), and its
                # delivery is not worked on here any more.
                sent = _clock()
                oldest = sent - self._lease_trusted
                fresh = [held for held in self._held.values() if held.renewed > oldest]
                if not fresh:
                    continue
                try:
                    await self.consumer.extend([held.delivery for held in fresh])
                except Exception:
                    logger.warning(
                        "eventwire: extending leases for %s failed", self.name, exc_info=True
                    )
                    continue
                for held in fresh:
                    held.renewed = max(held.renewed, sent)

    # -- finishing ------------------------------------------------------------------------

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Acknowledge `deliveries` now, and stop holding those held under themselves;
        raises what the broker raised."""
        await self.consumer.ack(deliveries)
        for delivery in deliveries:
            self._held.pop(id(delivery), None)

    def ack_later(self, deliveries: Sequence[Delivery]) -> None:
        """Acknowledge `deliveries` soon, batched with others; retried until it succeeds.

        They go along with the next fetch if it starts before the loop's next turn (a fetch
        loop that let its quick handlers run first), else on their own, at that turn."""
        self._acks.extend(deliveries)
        if self._acker is None and not self._acker_called:
            self._acker_called = True
            asyncio.get_running_loop().call_soon(self._start_acker)

    async def ack_now(self, delivery: Delivery) -> None:
        """Acknowledge `delivery` before returning; if the broker fails, it is acknowledged
        later, as by `ack_later`."""
        try:
            await self.consumer.ack([delivery])
        except Exception:
            logger.warning("eventwire: acknowledging for %s failed", self.name, exc_info=True)
            self.ack_later([delivery])

    def _start_acker(self) -> None:
        self._acker_called = False
        if self._acks and self._acker is None:
            self._acker = asyncio.get_running_loop().create_task(
                self.flush_acks(), name=f"eventwire:{self.name}:acks"
            )

    def _acks_to_send_along(self) -> list[Delivery]:
        """The pending acknowledgements a fetch may carry: none while they are being sent, or
        when handled ids must be recorded with them (those go on their own)."""
        if (
            not self._acks
            or self._acker is not None
            or self._handled_ids
            or not self.consumer.acks_with_fetch
        ):
            return []
        acks, self._acks = self._acks, []
        return acks

    async def record_handled(self, event_id: str) -> None:
        """Record at once that `event_id` was handled (idempotent subscriptions), before its
        batched acknowledgement; if the broker refuses now, it goes with the next one."""
        self._unrecorded.add(event_id)
        try:
            await self.consumer.ack([], handled_ids=[event_id])
        except Exception:
            logger.warning("eventwire: recording %s as handled failed", event_id, exc_info=True)
            self._handled_ids.append(event_id)
        else:
            self._unrecorded.discard(event_id)

    def handled_here(self, event_ids: Sequence[str]) -> set[str]:
        """Which of `event_ids` this process handled and is still recording as handled: the
        broker cannot tell yet (a slow or failed record, as while a cluster elects), and a
        redelivery of one must be skipped all the same."""
        return self._unrecorded.intersection(event_ids)

    async def flush_acks(self) -> None:
        """Send the pending acknowledgements; retried with a pause while the broker fails."""
        backoff = Backoff()
        try:
            while self._acks:
                acks, self._acks = self._acks, []
                handled, self._handled_ids = self._handled_ids, []
                try:
                    await self.consumer.ack(acks, handled_ids=handled)
                    self._unrecorded.difference_update(handled)
                except asyncio.CancelledError:  # still owed: whoever cancelled counts them
                    self._acks[:0] = acks
                    self._handled_ids[:0] = handled
                    raise
                except Exception:
                    # Unacknowledged work is delivered again (at least once), never lost.
                    logger.warning(
                        "eventwire: acknowledging %d event(s) for %s failed; retrying",
                        len(acks),
                        self.name,
                        exc_info=True,
                    )
                    self._acks[:0] = acks
                    self._handled_ids[:0] = handled
                    await backoff.wait()
        finally:
            if asyncio.current_task() is self._acker:
                self._acker = None

    async def _last_acks(self) -> None:
        """Send the acknowledgements still to go (those on their way first: closing before
        them would give their events back), for at most `GIVE_BACK_TIMEOUT` seconds: a broker
        that keeps refusing them (a full disk) must not keep the process from ending. What
        is not acknowledged then is delivered again (at least once)."""
        acker = self._acker
        try:
            async with asyncio.timeout(GIVE_BACK_TIMEOUT):
                if acker is not None:
                    await asyncio.shield(acker)
                await self.flush_acks()
        except TimeoutError:
            if acker is not None:
                acker.cancel()
                await asyncio.wait([acker])
            logger.warning(
                "eventwire: %d acknowledgement(s) for %s could not be sent before closing; "
                "those events will be delivered again",
                len(self._acks),
                self.name,
            )
            self._acks.clear()
            self._handled_ids.clear()
            self._unrecorded.clear()

    def give_back(self, key: object, delay: float = 0.0) -> bool:
        """Return the delivery held under `key` to the broker, to come again after `delay`
        seconds (in the background). False if nothing was held under it."""
        delivery = self.release(key)
        if delivery is None:
            return False
        task = asyncio.get_running_loop().create_task(
            self.consumer.nak(delivery, delay), name=f"eventwire:{self.name}:nak"
        )
        self._background.add(task)
        task.add_done_callback(self._background_done)
        return True

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning(
                "eventwire: giving back a delivery of %s failed",
                self.name,
                exc_info=task.exception(),
            )

    async def give_back_now(self, deliveries: Sequence[Delivery], delay: float = 0.0) -> None:
        """Return `deliveries` to the broker, waiting (at most `GIVE_BACK_TIMEOUT`); failures
        are left to their leases, which run out by themselves."""
        for delivery in deliveries:
            self._held.pop(id(delivery), None)
        if not deliveries:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(GIVE_BACK_TIMEOUT):
                await asyncio.gather(
                    *(self.consumer.nak(delivery, delay) for delivery in deliveries),
                    return_exceptions=True,
                )

    async def close(self) -> None:
        """Stop fetching and keeping leases, send pending acknowledgements, give back what is
        still held (at once, for another process to take; if the broker is unreachable it
        comes back by itself once its lease runs out), and close the consumer. Raises what
        closing the consumer raised. Idempotent."""
        if self._closed:
            return
        await self.stop_running()
        self._closed = True
        leaser, self._leaser = self._leaser, None
        if leaser is not None:
            leaser.cancel()
            await asyncio.wait([leaser])
        await self._last_acks()
        left = self.holding()
        self._held.clear()
        if self._background:
            await asyncio.wait(list(self._background), timeout=GIVE_BACK_TIMEOUT)
        if self.give_back_on_close:
            await self.give_back_now(left)
        await self.consumer.close()
