"""Shared by the Python end-to-end tests (serve_test.py, bench_serve_test.py): the repository
root, the MPI environment of the test machines, free ports, the process tree under /proc, and
the pass/fail tally."""

import os
import socket

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_rmaps_base_oversubscribe": "1", "OMPI_MCA_mpi_yield_when_idle": "1",
           "OMPI_MCA_btl": "self,vader", "OMPI_MCA_btl_vader_single_copy_mechanism": "none",
           "OPENBLAS_NUM_THREADS": "1"}


class Tally:
    """Counts checks; a failed one is printed with its detail."""

    def __init__(self):
        self.n_pass = 0
        self.n_fail = 0

    def check(self, name, ok, detail=""):
        if ok:
            self.n_pass += 1
        else:
            self.n_fail += 1
            print(f"FAILED: {name}" + (f": {detail}" if detail else ""), flush=True)
        return ok

    def ok(self):
        return self.n_fail == 0 and self.n_pass > 0


tally = Tally()
check = tally.check


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parent_pids():
    """{pid: parent pid} of every process, from /proc."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    return parent


def children(pid):
    """Direct children of `pid`."""
    return [c for c, p in parent_pids().items() if p == pid]


def descendants(pid):
    """Every process below `pid` (the ranks may leave mpirun's process group)."""
    parent = parent_pids()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out
