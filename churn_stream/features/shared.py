"""A feature store's state arrays in memory shared with one reading process.

The predictor's HTTP API runs in a process of its own and must read a user's state without
asking the consume loop's process for it (that request would wait on that process's GIL:
a p99 of 19 ms under load). So the store's arrays live in anonymous shared memory
(``memfd``: no file, no size limit of ``/dev/shm``, gone when the last process unmaps it);
the reader maps them read-only and gets the rest, which is small, as messages: users given
a slot or forgotten, the vocabulary (event types, properties, categories), and a new set of
arrays whenever the store grows.

Consistency is a sequence lock. The writer makes the counter odd before each change and
even after it, then sends the change's message tagged with that even value. A reader takes
a user's rows only while the counter is even, equal to the last message it applied, and the
same after the copy as before it; otherwise it tries again. The counter and the stream's
clock sit in a segment of their own that outlives every set of arrays.
"""

import mmap
import os
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle
from typing import Any

import numpy as np

from churn_stream.features.state import Shapes

ALIGN_BYTES = 64
WAIT_S = 5.0
"""How long a read waits for the writer's message that matches the counter."""
EPOCH_US = datetime(2000, 1, 1, tzinfo=UTC)
NO_CLOCK = np.iinfo(np.int64).min


@dataclass(frozen=True)
class Layout:
    """Where each array of one set lies in its segment: name, dtype, shape, byte offset."""

    arrays: tuple[tuple[str, str, tuple[int, ...], int], ...]
    size_bytes: int

    @classmethod
    def of(cls, shapes: Shapes) -> "Layout":
        arrays, offset = [], 0
        for name, (shape, dtype) in shapes.items():
            arrays.append((name, np.dtype(dtype).str, tuple(shape), offset))
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            offset += -(-nbytes // ALIGN_BYTES) * ALIGN_BYTES
        return cls(tuple(arrays), max(offset, ALIGN_BYTES))

    def views(self, buffer: Any) -> dict[str, np.ndarray]:
        return {name: np.ndarray(shape, np.dtype(dtype), buffer, offset)
                for name, dtype, shape, offset in self.arrays}


class Segment:
    """One anonymous shared mapping, writable here, handed to a reader by its descriptor."""

    def __init__(self, size_bytes: int, name: str) -> None:
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size_bytes)
        self.map = mmap.mmap(self.fd, size_bytes)

    def close(self) -> None:
        """Close the descriptor; the mapping goes when the last array viewing it does, and a
        reader's mapping stays valid until the reader lets it go."""
        os.close(self.fd)


class SharedArrays:
    """The writer's side: allocates state arrays in shared memory, counts changes, and tells
    the reader (one connection at a time) what changed."""

    def __init__(self) -> None:
        self.header = Segment(ALIGN_BYTES, "churn-state-header")
        self.counter = np.ndarray(2, np.int64, self.header.map)
        """[sequence, stream clock in microseconds since 2000 or NO_CLOCK]"""
        self.counter[:] = (0, NO_CLOCK)
        self.segment: Segment | None = None
        self.layout: Layout | None = None
        self.reader: Connection | None = None

    def allocate(self, shapes: Shapes) -> dict[str, np.ndarray]:
        """Fresh arrays of these shapes in a new segment; the previous one is released here."""
        layout = Layout.of(shapes)
        segment = Segment(layout.size_bytes, "churn-state")
        if self.segment is not None:
            self.segment.close()
        self.segment, self.layout = segment, layout
        return layout.views(segment.map)

    def set_clock(self, moment: datetime) -> None:
        self.counter[1] = (moment - EPOCH_US) // timedelta(microseconds=1)

    def begin(self) -> None:
        self.counter[0] += 1

    def end(self, change: dict[str, Any], new_arrays: bool) -> None:
        """Close a change (the counter even again) and send it to the reader, if one listens."""
        self.counter[0] += 1
        self.send({**change, "seq": int(self.counter[0])}, new_arrays)

    def send(self, message: dict[str, Any], new_arrays: bool) -> None:
        reader = self.reader
        if reader is None:
            return
        try:
            reader.send({**message, "layout": self.layout if new_arrays else None})
            if new_arrays:
                send_handle(reader, self.segment.fd, 0)
        except OSError:
            # The reader is gone; whoever started it starts another and connects it anew.
            self.reader = None

    def connect(self, reader: Connection, snapshot: dict[str, Any]) -> None:
        """Make ``reader`` the reader: it gets the header, the arrays and ``snapshot``."""
        self.reader = reader
        send_handle(reader, self.header.fd, 0)
        self.send({**snapshot, "seq": int(self.counter[0])}, new_arrays=True)


class Mirror:
    """The reader's side: the writer's arrays mapped here, its slot index and vocabulary
    kept up to date from its messages (``follow``), and consistent one-user copies."""

    def __init__(self, writer: Connection) -> None:
        self.writer = writer
        fd = recv_handle(writer)
        self.header = mmap.mmap(fd, ALIGN_BYTES, prot=mmap.PROT_READ)
        os.close(fd)
        self.counter = np.ndarray(2, np.int64, self.header)
        self.applied = -1
        self.slots: dict[str, int] = {}
        self.vocabulary: dict[str, Any] = {}
        self.state: dict[str, np.ndarray] = {}
        self.changed = threading.Condition()

    def follow(self) -> None:
        """Apply the writer's messages until it closes the connection."""
        while True:
            try:
                message = self.writer.recv()
                arrays = self._map(message["layout"]) if message["layout"] else None
            except (EOFError, OSError):
                return
            with self.changed:
                self._apply(message, arrays)
                self.changed.notify_all()

    def _map(self, layout: Layout) -> dict[str, np.ndarray]:
        fd = recv_handle(self.writer)
        mapped = mmap.mmap(fd, layout.size_bytes, prot=mmap.PROT_READ)
        os.close(fd)
        return layout.views(mapped)

    def _apply(self, message: dict[str, Any], arrays: dict[str, np.ndarray] | None) -> None:
        if "slots" in message:
            self.slots = dict(message["slots"])
        for user_id in message.get("forgotten", ()):
            self.slots.pop(user_id, None)
        self.slots.update(message.get("assigned", ()))
        if message.get("vocabulary") is not None:
            self.vocabulary = message["vocabulary"]
        if arrays is not None:
            self.state = arrays
        self.applied = message["seq"]

    def clock(self) -> datetime | None:
        """The writer's stream clock, None before its first event."""
        value = int(self.counter[1])
        return None if value == NO_CLOCK else EPOCH_US + timedelta(microseconds=value)

    def copy_of(self, user_id: str) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
        """``user_id``'s vocabulary and state rows as of one completed change; None if the
        writer does not hold the user. TimeoutError if the writer's messages stop coming."""
        deadline = time.monotonic() + WAIT_S
        with self.changed:
            while True:
                seq = int(self.counter[0])
                if seq == self.applied:  # even: messages carry the value that ends a change
                    slot = self.slots.get(user_id)
                    rows = None if slot is None else {
                        name: array[slot:slot + 1].copy() for name, array in self.state.items()}
                    if int(self.counter[0]) == seq:
                        return None if rows is None else (self.vocabulary, rows)
                elif time.monotonic() > deadline:
                    raise TimeoutError(f"no word from the state's writer for {WAIT_S:.0f} s "
                                       f"(counter {seq}, last message {self.applied})")
                else:
                    self.changed.wait(0.001)
