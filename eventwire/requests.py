"""Request/reply: the requests a bus waits on, and how each handler's outcome gets back.

A request is an event with `reply_to` set to the requesting bus's own reply topic. Each
handler that receives it reports its outcome (its return value, or its failure): to the
waiting request directly when the requester is this bus, whatever the backend, and as an
event on the reply topic otherwise (the requester runs in another process). The first
non-None value wins; when every receiver finished without one, the request fails with the
first handler error, or with `NoReplyError`. `Requester` is `EventBus.request` itself.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from eventwire.errors import BusClosedError, HandlerError, NoReplyError, RemoteHandlerError
from eventwire.event import Event
from eventwire.observe import SubscriptionInfo
from eventwire.options import SubscriptionOptions

logger = logging.getLogger("eventwire")

# Topics of request replies: one per requesting bus.
REPLY_PREFIX = "_bus.reply."

Publish = Callable[[str, Any], Awaitable[Any]]
ReplyHandler = Callable[[Event[Any]], Awaitable[None]]


class PendingRequest:
    """One request waiting for its first reply."""

    __slots__ = ("delivered", "error", "expected", "finished", "future", "topic")

    def __init__(self, future: asyncio.Future[Any], topic: str) -> None:
        self.future = future
        self.topic = topic
        # How many receivers will report, once known; and who they are, for messages.
        self.expected: int | None = None
        self.delivered: list[str] = []
        self.finished = 0
        self.error: tuple[str, BaseException] | None = None

    def outcome(self, subscription: str, result: Any, error: BaseException | None) -> None:
        if self.future.done():
            return
        self.finished += 1
        if error is None and result is not None:
            self.future.set_result(result)
            return
        if error is not None and self.error is None:
            self.error = (subscription, error)
        self.check_complete()

    def expect(self, receivers: list[str]) -> None:
        self.delivered = receivers
        self.expected = len(receivers)
        self.check_complete()

    def check_complete(self) -> None:
        if self.future.done() or self.expected is None or self.finished < self.expected:
            return
        if self.error is not None:
            name, error = self.error
            kind = getattr(error, "error_type", None) or type(error).__name__
            failure = HandlerError(
                f"request on {self.topic!r} failed in handler {name!r}: {kind}: {error}",
                subscription=name,
                error=f"{kind}: {error}",
            )
            failure.__cause__ = error
            self.future.set_exception(failure)
        else:
            self.future.set_exception(
                NoReplyError(
                    f"request on {self.topic!r}: every handler that received it "
                    f"({', '.join(self.delivered)}) finished without returning a reply "
                    "(a handler's non-None return value is its reply)"
                )
            )

    async def wait(self, timeout: float | None) -> Any:
        try:
            async with asyncio.timeout(timeout) as scope:
                return await asyncio.shield(self.future)
        except TimeoutError:
            if not scope.expired():
                raise
            raise TimeoutError(
                f"no reply to request on {self.topic!r} within {timeout}s; it reached "
                f"{', '.join(self.delivered) or 'no known subscription'} and "
                f"{self.finished} of them finished"
            ) from None


class Requests:
    """The requests one bus is waiting on, by request event id, and its reply topic."""

    def __init__(self, publish: Publish, track: Callable[[asyncio.Task[Any]], None]) -> None:
        self.reply_topic = f"{REPLY_PREFIX}{secrets.token_hex(6)}"
        self._publish = publish
        self._track = track
        self._pending: dict[str, PendingRequest] = {}

    def open(self, event: Event[Any]) -> PendingRequest:
        pending = PendingRequest(asyncio.get_running_loop().create_future(), event.topic)
        self._pending[event.id] = pending
        return pending

    def forget(self, event: Event[Any]) -> None:
        self._pending.pop(event.id, None)

    def reply(
        self,
        subscription: SubscriptionInfo,
        event: Event[Any],
        result: Any,
        error: BaseException | None,
    ) -> None:
        """Report a handler's outcome for the request `event`."""
        reply_to = event.reply_to
        if reply_to is None:
            return
        if reply_to == self.reply_topic:
            pending = self._pending.get(event.id)
            if pending is not None:
                pending.outcome(subscription.name, result, error)
            return  # otherwise its requester gave up (timeout) or it is a late answer
        if reply_to.startswith(REPLY_PREFIX):
            self._track(
                asyncio.get_running_loop().create_task(
                    self._send(subscription, event, reply_to, result, error)
                )
            )

    async def _send(
        self,
        subscription: SubscriptionInfo,
        event: Event[Any],
        reply_to: str,
        result: Any,
        error: BaseException | None,
    ) -> None:
        reply: dict[str, Any] = {
            "request": event.id,
            "subscription": subscription.name,
            "result": None,
            "error": None,
            "error_type": None,
        }
        if error is not None:
            reply["error"] = str(error)
            reply["error_type"] = type(error).__name__
        else:
            reply["result"] = result
        try:
            try:
                await self._publish(reply_to, reply)
            except (TypeError, ValueError) as unencodable:
                reply.update(
                    result=None,
                    error=f"the reply could not be sent: {unencodable}",
                    error_type=type(unencodable).__name__,
                )
                await self._publish(reply_to, reply)
        except Exception:
            logger.exception("eventwire: could not send the reply to request %s", event.id)

    async def on_reply(self, event: Event[Any]) -> None:
        """Handler of the bus's reply topic: an outcome from another process."""
        reply = event.payload
        if not isinstance(reply, dict):
            return
        pending = self._pending.get(str(reply.get("request")))
        if pending is None:
            return  # its requester gave up (timeout) or it is a late second answer
        error = reply.get("error")
        pending.outcome(
            str(reply.get("subscription")),
            reply.get("result"),
            RemoteHandlerError(str(error), str(reply.get("error_type"))) if error else None,
        )

    def close(self) -> None:
        """The bus closed: every request still waiting fails."""
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(
                    BusClosedError(
                        f"the bus closed before request on {pending.topic!r} got a reply"
                    )
                )


class Requester:
    """`EventBus.request`: publishes a request, and waits for its first reply."""

    def __init__(
        self,
        requests: Requests,
        *,
        subscribe: Callable[[str, ReplyHandler, SubscriptionOptions], object],
        wait_opened: Callable[[], Awaitable[None]],
        receivers: Callable[[str], Awaitable[list[str]]],
        publish: Callable[[Event[Any], Event[Any] | None], Awaitable[None]],
        where: str | None,
    ) -> None:
        self._requests = requests
        self._subscribe = subscribe
        self._subscribed = False
        # Subscriptions still being opened must exist before they can be counted as receivers.
        self._wait_opened = wait_opened
        self._receivers = receivers
        self._publish = publish
        # Where the receivers were looked for, for messages (None: in this process).
        self._where = where

    async def ask(self, event: Event[Any], parent: Event[Any] | None, timeout: float | None) -> Any:
        """Publish the request `event` (caused by `parent`) and return its first reply."""
        reply_topic = self._requests.reply_topic
        if not self._subscribed:
            # Handlers in other processes answer through the broker, on this bus's topic.
            self._subscribe(
                reply_topic, self._requests.on_reply, SubscriptionOptions(name=reply_topic)
            )
            self._subscribed = True
        await self._wait_opened()
        receivers = await self._receivers(event.topic)
        if not receivers:
            raise NoReplyError(
                f"no subscription matches {event.topic!r}"
                + ("" if self._where is None else f" on {self._where}")
                + ", so nothing can answer this request; subscribe a handler to it first"
            )
        pending = self._requests.open(event)
        try:
            pending.expect(receivers)
            await self._publish(event, parent)
            return await pending.wait(timeout)
        finally:
            self._requests.forget(event)
