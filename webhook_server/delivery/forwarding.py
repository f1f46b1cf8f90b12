"""The worker's forwarding loop: each target's deliveries, at most a few at once per target.

Forwards run apart from email and SMS, in a thread of their own with a pool per target: a slow
or dead target (up to its timeout a try) holds back only its own deliveries, never mail and
never another target. An ordered target has one send in flight at most, its oldest pending
delivery (`DeliveryQueue.claim_forwards`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

from webhook_server.delivery.queue import DeliveryQueue
from webhook_server.ingest.targets import Target
from webhook_server.notify import FORWARDS_PER_TARGET
from webhook_server.store.records import Notification

log = logging.getLogger(__name__)


class ForwardLoop:
    """Claims and sends forwarding deliveries; `deliver` sends one and records its outcome."""

    def __init__(
        self, queue: DeliveryQueue, targets: dict[str, Target], deliver: Callable[[Notification], str]
    ) -> None:
        self.queue = queue
        self.targets = targets
        self.deliver = deliver
        self.wake = threading.Event()  # a send finished, or new forwards were queued
        self._lock = threading.Lock()
        self._sending: dict[str, set[int]] = {name: set() for name in targets}  # delivery ids, by target
        self._pools = {
            name: ThreadPoolExecutor(self.capacity(t), thread_name_prefix=f"forward-{name}")
            for name, t in targets.items()
        }

    @staticmethod
    def capacity(target: Target) -> int:
        return 1 if target.ordered else FORWARDS_PER_TARGET

    def pass_once(self, wait_for_sends: bool = False) -> int:
        """Start what each target has room for; returns how many started (`wait_for_sends`: and
        wait for them, for tests and one-shot runs)."""
        started: list[Future[None]] = []
        for name, target in self.targets.items():
            sending = self._sending[name]
            with self._lock:
                room = self.capacity(target) - len(sending)
            if room <= 0:
                continue
            for notification in self.queue.claim_forwards(target, room):
                with self._lock:
                    if notification.delivery_id in sending:  # its lease ran out mid-send
                        continue
                    sending.add(notification.delivery_id)
                started.append(self._pools[name].submit(self._send, name, notification))
        if wait_for_sends:
            wait(started)
        return len(started)

    def _send(self, name: str, notification: Notification) -> None:
        try:
            self.deliver(notification)
        except Exception:  # the store failed while recording: the lease expires and it is retried
            log.exception("forward %s to %s: outcome not recorded", notification.delivery_id, name)
        finally:
            with self._lock:
                self._sending[name].discard(notification.delivery_id)
            self.wake.set()

    def run(self, stopping: Callable[[], bool], poll_seconds: float) -> None:
        """Loop until `stopping()`; sends in flight finish (each within its target's timeout)."""
        while not stopping():
            self.wake.clear()  # before the pass: a send finishing during it wakes the next wait
            try:
                started = self.pass_once()
            except Exception:  # a store error: logged, and the next pass tries again
                log.exception("forwarding pass failed")
                started = 0
            if not started:
                self.wake.wait(poll_seconds)
        for pool in self._pools.values():
            pool.shutdown(wait=True)
