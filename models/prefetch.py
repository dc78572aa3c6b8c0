"""Running a producer ahead of its consumer on a background thread.

The embedder (:mod:`finelake.models.embedding`) tokenizes and pads the next batches with
:class:`Prefetch` while the GPU runs the current one.
"""

from __future__ import annotations

import queue
import threading


class Prefetch:
    """Runs a generator in a daemon thread, ``depth`` items ahead of the consumer.

    The Rust tokenizer releases the GIL while it encodes and CUDA kernels run asynchronously, so
    host work for batch i+1 overlaps the forward pass of batch i. An exception in the producer is re-raised in the consumer at the item
    where it happened; :meth:`close` (or the consumer stopping early) stops the producer.
    """

    _END = object()

    def __init__(self, gen, depth: int = 2):
        self._q: "queue.Queue" = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._gen = gen
        self._thread = threading.Thread(target=self._work, name="finelake-embed-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        try:
            for item in self._gen:
                if not self._put((True, item)):
                    return
            self._put((True, self._END))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._put((False, exc))

    def __iter__(self):
        while True:
            ok, item = self._q.get()
            if not ok:
                raise item
            if item is self._END:
                return
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
