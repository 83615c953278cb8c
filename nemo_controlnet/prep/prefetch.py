"""A generator's items made in a background thread, a few ahead of the consumer: the captioning pass
(prep/caption.py) reads and decodes the next images while the model works on the current batch."""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator, NamedTuple


class _Raised(NamedTuple):
    error: BaseException


_DONE = object()


def prefetch(make: Callable[[threading.Event], Iterable], depth: int = 2) -> Iterator:
    """The items of ``make(stop)``, made in a background thread up to ``depth`` ahead; an exception there
    is raised here. Closing the iterator sets ``stop`` and waits for the thread, which should check it
    between items."""
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in make(stop):
                if not put(item):
                    return
            put(_DONE)
        except BaseException as e:  # handed to the consumer, which raises it
            put(_Raised(e))

    thread = threading.Thread(target=produce, name="caption-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, _Raised):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join(timeout=30)
