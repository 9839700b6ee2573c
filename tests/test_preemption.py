"""SIGTERM handling from the start of the process (msff_jax.train.preemption) and the
release of decode workers and their shared memory (data_pipeline.records.reader).

The phase-by-phase runs of launch.py are in tests/test_resume.py (one process) and
tests/test_distributed.py (two), beside the reference runs they compare with.
"""

import os
import signal
import subprocess
import sys

import pytest

from msff_jax.train import preemption
from tests.test_resume import FAILURE_WORDS, REPO

# A trainer-like process: SIGTERM taken from the start, then a train iterator whose two
# decode workers are still booting when the whole process group gets SIGTERM.
WORKERS_BORN_DURING_THE_SIGNAL = """
import os, signal, sys, threading

from msff_jax.train import preemption


def main(data_dir):
    preemption.install()
    from data_pipeline.records import reader

    iterator = reader.make_train_iterator(data_dir, global_batch_size=16, image_size=32, seed=0,
                                          worker_count=2, read_threads=1, prefetch_buffer=1)
    timer = threading.Timer(0.3, lambda: os.killpg(0, signal.SIGTERM))
    timer.start()  # Lands while next() below waits for the workers to boot.
    for _ in range(12):
        next(iterator)
    timer.join()
    print("requested", preemption.requested(), flush=True)
    iterator.close()
    # An eval pass run to its end: its last batches stay in reference cycles, which
    # reader.shutdown (at exit) collects before the resource tracker looks.
    for _ in reader.make_eval_iterator(data_dir, split="val", global_batch_size=64, image_size=32,
                                       worker_count=2):
        pass
    print("done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
"""


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    from data_pipeline.conversion import digits

    directory = str(tmp_path_factory.mktemp("preemption") / "digits")
    digits.write_digits_shards(directory, image_size=32, seed=0)
    return directory


def _python(tmp_path, source, *args):
    script = tmp_path / "script.py"
    script.write_text(source)
    return subprocess.run([sys.executable, str(script), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, start_new_session=True,
                          env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"))


def test_workers_born_during_a_group_sigterm_survive_and_nothing_leaks(digits_dir, tmp_path):
    """Workers started after `install()` are born with SIGTERM blocked, so a signal to the
    process group while they boot (the window in which they used to die) leaves them
    alive; the trainer gets the flag; no shared memory is left for the resource tracker
    to report, an evaluation pass run to its end included."""
    result = _python(tmp_path, WORKERS_BORN_DURING_THE_SIGNAL, digits_dir)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "requested True" in result.stdout and "done" in result.stdout, output[-3000:]
    for word in FAILURE_WORDS:
        assert word not in output, output[-3000:]


def test_uninstall_gives_a_taken_sigterm_back():
    """Modes other than training uninstall the listener; a SIGTERM taken before that
    then ends the process as SIGTERM always did."""
    source = ("import os, signal, time\n"
              "from msff_jax.train import preemption\n"
              "preemption.install()\n"
              "os.kill(os.getpid(), signal.SIGTERM)\n"
              "for _ in range(200):\n"
              "    if preemption.requested(): break\n"
              "    time.sleep(0.01)\n"
              "print('requested', preemption.requested(), flush=True)\n"
              "preemption.uninstall(resend=True)\n"
              "time.sleep(5)\n"
              "print('still alive', flush=True)\n")
    result = subprocess.run([sys.executable, "-c", source], cwd=REPO, capture_output=True, text=True,
                            timeout=60, env=dict(os.environ, PYTHONPATH=REPO))
    assert "requested True" in result.stdout, result.stderr[-2000:]
    assert result.returncode == -signal.SIGTERM and "still alive" not in result.stdout


def test_test_hook_refuses_bad_entries_and_a_group_it_does_not_lead(monkeypatch):
    monkeypatch.setenv(preemption.TEST_HOOK_ENV, "save:3:everyone")
    with pytest.raises(ValueError, match="'save:3:everyone'.*'group' or 'self'"):
        preemption.signal_point("save", 3)
    # A child in pytest's process group (not its leader): the hook refuses to signal the
    # group, which would reach pytest too.
    source = ("from msff_jax.train import preemption\n"
              "try:\n"
              "    preemption.signal_point('save', 3)\n"
              "except RuntimeError as err:\n"
              "    print(err)\n")
    result = subprocess.run([sys.executable, "-c", source], cwd=REPO, capture_output=True, text=True,
                            timeout=60, env=dict(os.environ, PYTHONPATH=REPO,
                                                 **{preemption.TEST_HOOK_ENV: "save:3:group"}))
    assert result.returncode == 0 and "leads its own group" in result.stdout, result.stderr[-2000:]
