"""Progress lines: silent for short loops, throttled, with a final line once anything was printed."""
from pangu_moe.progress import Progress


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_short_loops_are_silent_and_long_ones_throttled_with_a_final_line():
    clock, lines = Clock(), []
    quick = Progress("eval", "batches", every=2.0, log=lines.append, clock=clock)
    for done in range(1, 4):
        clock.now += 0.5
        quick.update(done, 3)
    assert lines == []
    clock.now = 0.0
    slow = Progress("eval", "batches", every=2.0, log=lines.append, clock=clock)
    for done in range(1, 6):
        clock.now += 1.5  # lines when 2 s have passed since the last: after 3.0 s and 6.0 s, then the final one
        slow.update(done, 5)
    assert lines == ["eval: 2/5 batches (40%), elapsed 3s, eta 4s",
                     "eval: 4/5 batches (80%), elapsed 6s, eta 2s",
                     "eval: 5/5 batches (100%), elapsed 8s, eta 0s"]
