"""Stops that lose nothing: SIGINT (Ctrl-C) and SIGTERM finish the step in flight, then the trainer writes a
checkpoint and raises `TrainingStopped`; a second signal ends the process at once."""
import signal

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingStopped(Exception):
    """Raised by `Trainer.train` after the checkpoint of a signalled stop. `exit_code` is 128 + the signal number,
    what a shell reports for a process the signal ended."""

    def __init__(self, signum, step, checkpoint_path, resume_hint):
        self.signum, self.step, self.checkpoint_path = signum, step, checkpoint_path
        self.exit_code = 128 + signum
        # A Ctrl-C arrives here as SIGTERM once MindSpore has run a graph (StopOnSignal), so the name says so
        # rather than tell a user who pressed Ctrl-C that something else stopped the run.
        name = signal.Signals(signum).name + (" (or Ctrl-C, which MindSpore passes on as SIGTERM)"
                                              if signum == signal.SIGTERM else "")
        super().__init__(f"stopped by {name} after step {step}: checkpoint {checkpoint_path}; resume with: "
                         f"{resume_hint}")


class StopOnSignal:
    """A context that records the first SIGINT/SIGTERM in `signum` instead of ending the process, and gives both
    signals back their default action, so a second one ends the process in the kernel at once, even inside a
    compiled step or a collective that never returns. Outside the context the previous handlers are back. Handlers can only be set from the main thread; elsewhere the
    context records nothing and the default actions stay. Once MindSpore has run a graph, a SIGINT (Ctrl-C)
    reaches this handler as SIGTERM: MindSpore's runtime handles SIGINT itself and sends the process a SIGTERM
    (seen with `kill -INT` on a `pangu-moe train` of configs/smoke_cpu.yaml)."""

    def __init__(self):
        self.signum, self._previous = None, {}

    def __enter__(self):
        try:
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        except ValueError:  # not the main thread
            self._previous = {}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False

    def _handle(self, signum, frame):
        self.signum = signum
        for s in SIGNALS:
            signal.signal(s, signal.SIG_DFL)
