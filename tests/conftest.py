"""Test-session settings and the fixtures tests of several folders share.

The tests follow the package: one folder a kernel family (``moe/`` for the MoE layer's two,
``attention/``, ``norm_linear/``, ``patch_embed/``, ``loss/``, ``augment/``, ``mae_tokens/``,
``mae_loss/``), ``checks/`` for what holds across families (bounds, hazards, budgets and meters,
the sm_90 rule, clearance, compile and capture), ``app/`` for the models, data, training and
command line. Helpers several folders import live here: ``bounds.py``, ``shared_data.py``,
``fake_families.py``.

Without CUDA, Triton kernels run on the CPU through Triton's interpreter, which must be switched
on before triton is first imported. Torch runs one thread per process by default here: on a
shared 2-core machine, OpenMP threads of several processes spinning against each other made
small steps up to 40x slower (set MLIT_TEST_THREADS to change it). No test reads or writes this
machine's clearance cache (``MLIT_CACHE_DIR`` points into the session's temporary directory).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(int(os.environ.get("MLIT_TEST_THREADS", "1")))


@pytest.fixture(autouse=True, scope="session")
def _private_machine_cache(tmp_path_factory):
    """The session's own machine cache (child processes inherit it through the environment)."""
    os.environ["MLIT_CACHE_DIR"] = str(tmp_path_factory.mktemp("machine-cache"))


@pytest.fixture
def machine_cache(tmp_path, monkeypatch):
    """A fresh, empty machine cache for one test, no ``MLIT_UNCLEARED_KERNELS``, and every
    clearance decision taken again; returns the cache's folder."""
    from mlit_kernels.common import clearance
    from mlit_kernels.common import machine_cache as cache

    folder = tmp_path / "machine-cache"
    monkeypatch.setenv(cache.ENV, str(folder))
    monkeypatch.delenv(clearance.ENV, raising=False)
    monkeypatch.setattr(clearance, "_DECIDED", {})
    monkeypatch.setattr(clearance, "_WARNED", set())
    return folder
