"""Repository-wide pytest set-up (tests/ and examples/).

OpenBLAS backs the CPU LAPACK calls (SVD, QR) of jax, numpy and torch here. With its default
threading on a small, busy machine an SVD is 10–20× slower (threads fight XLA's own pool), so
the tests pin it to one thread before anything imports numpy.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
