"""Progress lines for loops that run longer than a few seconds (stderr, so stdout stays parseable)."""
import sys
import time


class Progress:
    """Prints "LABEL: done/total UNIT (pct), elapsed Ns, eta Ns" at most once per `every` seconds.

    A loop that finishes within `every` seconds prints nothing; one that printed gets a final line. The ETA is
    the rate since the first update, which leaves out what only the first unit pays (compiling a graph).

    Args:
        label: what is running (e.g. "eval"); unit: what is counted (e.g. "batches");
        every: seconds between lines; log: callable taking one line (default: print to stderr);
        clock: seconds, monotonic (injectable for tests).
    """

    def __init__(self, label, unit, every=2.0, log=None, clock=time.monotonic):
        self.label, self.unit, self.every, self.log, self.clock = label, unit, every, log or _stderr, clock
        self.start = self.last = clock()
        self.printed = False
        self.first = None  # (time, done) of the first update

    def update(self, done, total):
        """Report that `done` of `total` units are finished."""
        now = self.clock()
        if self.first is None:
            self.first = (now, done)
        final = done >= total
        if now - self.last < self.every and not (final and self.printed):
            return
        elapsed = now - self.start
        since, before = self.first
        if done > before:
            eta = (now - since) / (done - before) * (total - done)
        else:
            eta = elapsed / done * (total - done) if done else 0.0
        self.log(f"{self.label}: {done}/{total} {self.unit} ({done / total:.0%}), elapsed {elapsed:.0f}s, "
                 f"eta {eta:.0f}s")
        self.last, self.printed = now, True


def _stderr(line):
    print(line, file=sys.stderr, flush=True)
