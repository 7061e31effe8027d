"""CUDA streams and events behind one small interface, with a synchronous stand-in.

The executor issues loads on a load stream, stores on a store stream and compute on the current stream, and
orders them with events. With `overlap=False`, or on a CPU compute device, every "stream" is the current one
and every event wait is a no-op: the same loop then runs synchronously (the debug mode).
"""
from __future__ import annotations

import contextlib

import torch


class Lane:
    """One ordered queue of device work: a real CUDA stream, or the caller's own thread of execution."""

    def __init__(self, device: torch.device, separate: bool):
        self.is_async = separate and device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.is_async else None

    def context(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def record(self) -> "torch.cuda.Event | None":
        """An event marking everything issued on this lane so far (None when synchronous)."""
        if self.stream is None:
            return None
        ev = torch.cuda.Event()
        ev.record(self.stream)
        return ev

    def wait(self, event: "torch.cuda.Event | None") -> None:
        """Make later work on this lane wait for `event`."""
        if event is not None and self.stream is not None:
            self.stream.wait_event(event)


def current_wait(event: "torch.cuda.Event | None") -> None:
    """Make the compute (current) stream wait for an event."""
    if event is not None:
        torch.cuda.current_stream().wait_event(event)


def current_record(device: torch.device) -> "torch.cuda.Event | None":
    if device.type != "cuda":
        return None
    ev = torch.cuda.Event()
    ev.record(torch.cuda.current_stream())
    return ev
