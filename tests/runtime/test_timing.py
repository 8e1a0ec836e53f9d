"""Wall-clock seconds per pass and since the command started, on a clock the test sets."""

import moequant.runtime.timing as timing


class _Clock:
    def __init__(self, *ticks):
        self.ticks = list(ticks)
        self.now = 1000.0

    def perf_counter(self):
        return self.ticks.pop(0)

    def time(self):
        return self.now


def test_passes_add_up_in_the_order_they_first_ran(monkeypatch):
    clock = _Clock(10.0, 12.5, 20.0, 21.0, 30.0, 30.25)
    monkeypatch.setattr(timing, "time", clock)
    timing.reset()
    with timing.timed("profile"):
        pass
    with timing.timed("quantize"):
        pass
    with timing.timed("profile"):  # a pass run twice counts both runs
        pass
    assert timing.passes() == {"profile": 2.75, "quantize": 1.0}
    assert list(timing.passes()) == ["profile", "quantize"]
    clock.now = 1004.5
    assert timing.elapsed() == 4.5  # since reset()
    clock.now = 999.0
    assert timing.elapsed() == 0.0  # never negative
    timing.reset()
    assert timing.passes() == {}
