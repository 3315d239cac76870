"""Counting the device kernels a piece of PyTorch code would launch, on any device (CPU included).

Every ATen operator that reaches the dispatcher below autograd is one kernel launch on a GPU, except
views, metadata and allocations (listed below); each launch of a fused Triton kernel counts once (the
Triton interpreter's own tensor traffic inside it is not counted). Host synchronisations are counted
separately: reading a tensor's value on the host (``.item()``, ``bool(tensor)``, ``.tolist()``).
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from drpose_kernels import pose_score_op

NOT_LAUNCHES = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias", "lift_fresh",
    "set_", "resize_", "_local_scalar_dense", "is_nonzero", "item", "_to_copy_meta", "sym_size", "sym_stride",
    "sym_numel", "sym_storage_offset", "size", "stride", "dim", "numel", "is_same_size", "_has_compatible_shallow_copy_type",
}
HOST_READS = {"_local_scalar_dense", "is_nonzero", "item"}
HOST_READ_METHODS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "numpy"}


class _HostReads(TorchFunctionMode):
    """Tensor methods that hand a value to the host (on CPU these never reach the dispatcher)."""

    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in HOST_READ_METHODS and not self.counter._inside_fused:
            self.counter.host_reads += 1
            self.counter._reading += 1
            try:
                return func(*args, **(kwargs or {}))
            finally:
                self.counter._reading -= 1
        return func(*args, **(kwargs or {}))


class LaunchCounter(TorchDispatchMode):
    """``with LaunchCounter() as counter: ...``; then ``counter.launches`` (Counter by operator name),
    ``counter.total`` and ``counter.host_reads``."""

    def __init__(self):
        super().__init__()
        self.launches: Counter = Counter()
        self.host_reads = 0
        self._inside_fused = 0
        self._reading = 0

    @property
    def total(self) -> int:
        return sum(self.launches.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self._inside_fused:
            if name in HOST_READS:
                self.host_reads += 0 if self._reading else 1
            elif name not in NOT_LAUNCHES and not func.is_view:
                self.launches[name] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        counter = super().__enter__()
        self._patch = _count_fused_launches(self)
        self._patch.__enter__()
        self._function_mode = _HostReads(self)
        self._function_mode.__enter__()
        return counter

    def __exit__(self, *exc):
        self._function_mode.__exit__(*exc)
        self._patch.__exit__(*exc)
        return super().__exit__(*exc)


@contextmanager
def _count_fused_launches(counter: LaunchCounter):
    original = pose_score_op.KernelLaunch.run

    def run(launch):
        counter.launches[f"triton:{launch.name}"] += 1
        counter._inside_fused += 1
        try:
            return original(launch)
        finally:
            counter._inside_fused -= 1

    pose_score_op.KernelLaunch.run = run
    try:
        yield
    finally:
        pose_score_op.KernelLaunch.run = original
