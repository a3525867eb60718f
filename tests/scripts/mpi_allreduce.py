"""mpi4py allreduce over all ranks; prints one JSON line per rank."""

import json
import socket

from mpi4py import MPI

comm = MPI.COMM_WORLD
total = comm.allreduce(comm.rank + 1, op=MPI.SUM)
print(
    json.dumps({"rank": comm.rank, "size": comm.size, "host": socket.gethostname(), "sum": total}),
    flush=True,
)
