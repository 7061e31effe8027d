"""`flexserve.memory.streams`: on the CPU (or with overlap off) every lane is the caller's own thread and every
event is None; with separate CUDA lanes, events are recorded on the lane that issued the work and waited on by
the lane (or the current stream) that needs it. CI has no CUDA, so the CUDA objects are recorders."""
import contextlib

import pytest
import torch

from flexserve.memory.streams import Lane, current_record, current_wait

CUDA = torch.device("cuda", 0)


class Journal:
    """Stand-ins for torch.cuda's Stream, Event, stream() and current_stream(), writing what happens."""

    def __init__(self):
        self.log = []
        self.streams = 0
        self.events = 0
        self.current = FakeStream(self, "current")

    def new_stream(self, device):
        s = FakeStream(self, f"stream{self.streams}")
        self.streams += 1
        self.log.append(("new-stream", s.name, device))
        return s

    def new_event(self):
        self.events += 1
        return FakeEvent(self, f"event{self.events - 1}")

    @contextlib.contextmanager
    def stream(self, s):
        self.log.append(("enter", s.name))
        yield
        self.log.append(("exit", s.name))


class FakeStream:
    def __init__(self, journal, name):
        self.journal, self.name = journal, name

    def wait_event(self, event):
        self.journal.log.append(("wait", self.name, event.name))


class FakeEvent:
    def __init__(self, journal, name):
        self.journal, self.name = journal, name

    def record(self, stream):
        self.journal.log.append(("record", self.name, stream.name))


@pytest.fixture
def journal(monkeypatch):
    j = Journal()
    monkeypatch.setattr(torch.cuda, "Stream", j.new_stream)
    monkeypatch.setattr(torch.cuda, "Event", j.new_event)
    monkeypatch.setattr(torch.cuda, "stream", j.stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: j.current)
    return j


@pytest.mark.parametrize("device, separate", [(torch.device("cpu"), True), (torch.device("cpu"), False),
                                              (CUDA, False)], ids=["cpu", "cpu-no-overlap", "cuda-no-overlap"])
def test_a_synchronous_lane_touches_no_cuda_and_its_events_are_none(journal, device, separate):
    lane = Lane(device, separate)
    assert not lane.is_async and lane.stream is None
    with lane.context():
        x = torch.ones(3) * 2  # work runs right here, in order
    assert x.sum() == 6
    assert lane.record() is None
    lane.wait(None)
    lane.wait(journal.new_event())  # even a real event is not waited on: there is no stream to order
    assert current_record(torch.device("cpu")) is None
    current_wait(None)
    assert journal.log == []


def test_separate_cuda_lanes_order_work_through_events(journal):
    load, store = Lane(CUDA, True), Lane(CUDA, True)
    assert load.is_async and store.is_async
    assert journal.log == [("new-stream", "stream0", CUDA), ("new-stream", "stream1", CUDA)]
    journal.log.clear()
    with load.context():
        pass
    loaded = load.record()  # everything issued on the load lane so far
    current_wait(loaded)  # compute waits for the load
    computed = current_record(CUDA)  # then marks its own progress
    store.wait(computed)  # and the store lane waits for the compute
    current_wait(None)
    store.wait(None)
    assert journal.log == [("enter", "stream0"), ("exit", "stream0"), ("record", "event0", "stream0"),
                           ("wait", "current", "event0"), ("record", "event1", "current"),
                           ("wait", "stream1", "event1")]
