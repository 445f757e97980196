"""Real child processes for the tests of shared artefacts: builds started at the same moment, builds killed with
SIGKILL, then rerun (tests/test_concurrency.py, tests/test_image_store.py, tests/test_outofcore.py, ...).

A child runs ``PRELUDE`` + the test's code with ``python -c``, with this repository first on ``PYTHONPATH``; its
stdout and stderr go to ``<logdir>/<name>.out`` / ``.err``. ``PRELUDE`` gives the code ``barrier()`` (wait for the
go file, so that several children start building together; call it right before the build) and
``kill_at_replace(n, after=False)`` (SIGKILL at the n-th ``os.replace``: a crash at a publication step).
Random kill moments come from ``SEED`` (printed on failure by the tests; set RECBOLE_MM_TEST_SEED to replay).
"""

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import recbole_mm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(recbole_mm.__file__)))
SEED = int(os.environ.get("RECBOLE_MM_TEST_SEED") or time.time_ns() % 1_000_000)

PRELUDE = r'''
import os, sys, time, signal, logging
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")


def barrier():
    """Say "ready", wait for the go file, then say "started" (the build begins now)."""
    ready, go, started = (os.environ.get(k) for k in ("TEST_READY", "TEST_GO", "TEST_STARTED"))
    if ready:
        open(ready, "w").close()
        while not os.path.exists(go):
            time.sleep(0.002)
    if started:
        open(started, "w").close()


def kill_at_replace(n, after=False):
    """SIGKILL this process at its n-th os.replace (before or after it runs): a crash at a publication step."""
    real, calls = os.replace, [0]

    def replace(src, dst, *args, **kwargs):
        calls[0] += 1
        if calls[0] == n and not after:
            os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst, *args, **kwargs)
        if calls[0] == n and after:
            os.kill(os.getpid(), signal.SIGKILL)

    os.replace = replace
'''


def child_env(extra=None):
    """The environment of a child: this one, the repository first on ``PYTHONPATH``, one BLAS / OpenMP thread."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1")
    env.update(extra or {})
    return env


class Worker:
    """``PRELUDE`` + ``code`` running in a child process (started at once); :meth:`wait` collects its output."""

    def __init__(self, code, logdir, name, env=None):
        self.out_path, self.err_path = os.path.join(logdir, f"{name}.out"), os.path.join(logdir, f"{name}.err")
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], stdout=out,
                                         stderr=err, env=child_env(env), cwd=logdir)

    def wait(self, timeout=300):
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # never leave a hung worker behind
            self.proc.wait()
            raise AssertionError(f"worker hung for {timeout}s; stderr: {open(self.err_path).read()[-3000:]}")
        with open(self.out_path) as f:
            self.stdout = f.read()
        with open(self.err_path) as f:
            self.stderr = f.read()
        return self.proc.returncode


def wait_for(path, proc, timeout=300):
    """Wait until ``path`` exists (``True``) or ``proc`` has ended (``False``)."""
    end = time.time() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            return False
        assert time.time() < end, f"worker never reached {path}"
        time.sleep(0.005)
    return True


def run_together(code, logdir, n, name="w"):
    """Run ``n`` copies of ``code`` that start building at the same moment (barrier). Returns the workers."""
    go = os.path.join(logdir, f"{name}.go")
    workers = [Worker(code, logdir, f"{name}{i}", {"TEST_READY": os.path.join(logdir, f"{name}{i}.ready"),
                                                    "TEST_GO": go}) for i in range(n)]
    for i, w in enumerate(workers):
        wait_for(os.path.join(logdir, f"{name}{i}.ready"), w.proc)
    open(go, "w").close()
    for w in workers:
        w.wait()
    return workers


def built_once(workers, builder_says):
    """The stdout of ``workers`` (of :func:`run_together`), after checking that each succeeded, all printed the same
    and exactly one built: ``builder_says`` is in the stderr of one worker, once."""
    for w in workers:
        assert w.proc.returncode == 0, w.stderr[-3000:]
    results = {w.stdout for w in workers}
    assert len(results) == 1
    assert sum(w.stderr.count(builder_says) for w in workers) == 1  # one builder, the others waited
    return results.pop()


def run_killed_at(code, logdir, name):
    """Run ``code`` (which arranges its own SIGKILL); check it was killed."""
    w = Worker(code, logdir, name)
    rc = w.wait()
    assert rc == -signal.SIGKILL, f"worker was not killed (rc {rc}):\n{w.stderr[-3000:]}"
    return w


def run_killed_after(code, logdir, name, delay):
    """Run ``code`` and SIGKILL it ``delay`` seconds after it starts building (it may finish first)."""
    started = os.path.join(logdir, f"{name}.started")
    w = Worker(code, logdir, name, {"TEST_STARTED": started})
    if wait_for(started, w.proc):
        time.sleep(delay)
        w.proc.send_signal(signal.SIGKILL)
    w.wait()
    return w


@contextlib.contextmanager
def replay_hint(delay):
    """Prefix a failed check after a kill at a random moment with ``SEED`` and the delay (to replay the run)."""
    try:
        yield
    except AssertionError as e:
        raise AssertionError(f"seed {SEED}, kill after {delay:.3f}s: {e}") from e


def file_sha(path):
    """SHA-256 (hex) of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def read_tree(root):
    """``relative path -> bytes`` of every file below ``root``."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


def two_nodes_on_this_machine(command: list, node0, cwd: str) -> str:
    """The multi-node recipe with two "nodes" of one process here: ``recbole-mm <command> --nproc 1 --nnodes 2
    --master-addr 127.0.0.1 --master-port P --node-rank 1`` in a new process while ``node0(args)`` runs node 0 (the
    same command with ``--node-rank 0``) in this one; returns node 1's stdout (it must succeed)."""
    from recbole_mm import distributed

    common = [*command, "--nproc", "1", "--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port",
              str(distributed.free_port())]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    node1 = subprocess.Popen([sys.executable, "-m", "recbole_mm.cli", *common, "--node-rank", "1"], cwd=cwd,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        node0([*common, "--node-rank", "0"])
        out, err = node1.communicate(timeout=300)
    finally:
        if node1.poll() is None:
            node1.kill()
    assert node1.returncode == 0, err[-4000:]
    return out

