"""Test-wide settings.

* Without CUDA, Triton kernels run in Triton's interpreter: TRITON_INTERPRET must be set before
  triton.jit decorates anything, so it is set here, before any test module imports drpose_kernels.
* Under pytest-xdist (the default: ``-n auto``) every worker and the processes its tests launch compute
  with an equal share of the cores (``OMP_NUM_THREADS``, and as many reconstruction processes:
  ``DRPOSE_RECONSTRUCTION_WORKERS``), so that the workers do not oversubscribe them.
* Hypothesis runs derandomized by default ("ci" profile) so that CI is reproducible; select
  ``--hypothesis-profile=explore`` for fresh random examples while developing.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if "PYTEST_XDIST_WORKER" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    _threads = max(1, len(os.sched_getaffinity(0)) // max(_workers, 1))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(_threads)
    # and the reconstruction's process pool (drpose/reconstruction/reconstruct.py) keeps to the same share
    os.environ.setdefault("DRPOSE_RECONSTRUCTION_WORKERS", str(_threads))
    torch.set_num_threads(_threads)

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci", derandomize=True, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("explore", deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
