"""Test-session settings.

Without CUDA, Triton kernels run on the CPU through Triton's interpreter, which must be switched
on before triton is first imported. Torch runs one thread per process by default here: on a
shared 2-core machine, OpenMP threads of several processes spinning against each other made
small steps up to 40x slower (set MLIT_TEST_THREADS to change it).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(int(os.environ.get("MLIT_TEST_THREADS", "1")))
