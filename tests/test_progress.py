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


def test_the_eta_leaves_out_the_first_units_cost():
    """The first unit takes 30 s (compiling), the next ones 1 s each: the ETA counts 1 s a unit."""
    clock, lines = Clock(), []
    progress = Progress("generate", "bytes", every=2.0, log=lines.append, clock=clock)
    clock.now += 30.0
    progress.update(1, 10)
    assert lines == ["generate: 1/10 bytes (10%), elapsed 30s, eta 270s"]  # no rate yet but the first unit's
    for done in range(2, 6):
        clock.now += 1.0
        progress.update(done, 10)
    assert lines[1:] == ["generate: 3/10 bytes (30%), elapsed 32s, eta 7s", "generate: 5/10 bytes (50%), elapsed 34s, "
                                                                           "eta 5s"]
