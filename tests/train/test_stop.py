"""Signals during training: the first is recorded, the second ends the process at once."""
import signal
import subprocess
import sys
import textwrap

from pangu_moe.train.stop import StopOnSignal

SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from pangu_moe.train.stop import StopOnSignal
    with StopOnSignal() as stopper:
        os.kill(os.getpid(), signal.SIGINT)
        print(stopper.signum, flush=True)
        os.kill(os.getpid(), signal.SIGINT)
        print("still running", flush=True)
""")


def test_the_first_signal_is_recorded_and_the_second_ends_the_process():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert done.stdout.split("\n")[0] == str(int(signal.SIGINT))
    assert "still running" not in done.stdout and done.returncode == -signal.SIGINT


def test_handlers_are_restored_and_other_threads_record_nothing():
    import threading
    before = signal.getsignal(signal.SIGTERM)
    with StopOnSignal():
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before
    seen = []

    def worker():
        with StopOnSignal() as stopper:
            seen.append((stopper.signum, signal.getsignal(signal.SIGTERM) is before))
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [(None, True)]
