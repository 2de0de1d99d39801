"""Run a torch program on several gloo ranks on loopback, for the torch ring tests.

Each rank is a fresh ``python worker.py RANK WORLD PORT FOLDER CASES`` process: a script rather than a
function of a test module, so that a rank imports only numpy, torch and torch_ref (importing a test
module would also import JAX and Flax, seconds per process on a small machine). The caller gives the
body of the rank program; it runs between ``init_process_group`` and ``destroy_process_group`` with
``rank``, ``world``, ``folder``, ``cases`` (the literal ``cases`` list), ``data`` (the inputs) and
``results`` (a dict saved as ``out{rank}.npz``) defined.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

ROOT = str(Path(__file__).resolve().parents[1])

_PROLOGUE = """
import ast, os, sys
import numpy as np
import torch
import torch.distributed as dist
import torch_ref as tr

rank, world, port, folder = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
cases = ast.literal_eval(sys.argv[5])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
try:
    data = np.load(os.path.join(folder, "inputs.npz"))
    results = {}
"""

_EPILOGUE = """
    np.savez(os.path.join(folder, f"out{rank}.npz"), **results)
    # Every rank is done before any tears the group down: a rank that closes its gloo connections
    # while a peer still uses them can abort the peer ("terminate called without an active exception").
    import datetime
    dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
finally:
    dist.destroy_process_group()
"""


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(body: str, world: int, data: dict[str, np.ndarray], cases: list, timeout: float = 120) -> list[dict]:
    """Run ``body`` on ``world`` gloo ranks; returns each rank's ``results`` as a dict of arrays."""
    source = _PROLOGUE + textwrap.indent(textwrap.dedent(body), "    ") + _EPILOGUE
    with tempfile.TemporaryDirectory() as folder:
        np.savez(os.path.join(folder, "inputs.npz"), **data)
        script = os.path.join(folder, "worker.py")
        with open(script, "w") as f:
            f.write(source)
        port = str(free_port())
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
        procs = [subprocess.Popen([sys.executable, script, str(r), str(world), port, folder, repr(cases)],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(world)]
        logs = [p.communicate(timeout=timeout)[0].decode() for p in procs]
        assert all(p.returncode == 0 for p in procs), "\n".join(logs)
        return [dict(np.load(os.path.join(folder, f"out{r}.npz"))) for r in range(world)]
