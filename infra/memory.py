"""Per-phase time and memory of a training step (generate, score, update): CUDA peaks, or on CPU the tally of
model states, the activations saved for backward and the process RSS.
"""

import contextlib
import os
import resource
import time

import torch


def local(t):
    """This rank's part of a tensor FSDP2 shards (a DTensor), else the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def state_bytes(models=(), optimizers=()):
    """Bytes of parameters, gradients and optimizer state held by these models and optimizers (this rank's
    shards under FSDP2)."""
    nbytes = lambda t: local(t).numel() * t.element_size()  # noqa: E731
    params = sum(nbytes(p) for m in models for p in m.parameters())
    grads = sum(nbytes(p.grad) for m in models for p in m.parameters() if p.grad is not None)
    opt = sum(nbytes(v) for o in optimizers for s in o.state.values() for v in s.values() if torch.is_tensor(v))
    return {"params": params, "grads": grads, "optimizer": opt}


def rss_bytes():
    """Resident set size of this process now (Linux /proc), else the peak from getrusage."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Probe:
    """Per-phase wall time and memory. On CUDA: peak allocated bytes within each phase
    (torch.cuda.max_memory_allocated, reset at the phase's start). On CPU: the tally of parameter, gradient and
    optimizer-state bytes at the phase's end, with process RSS beside it. On both: the peak bytes of
    activations saved for backward (parameters excluded, shared storage counted once)."""

    def __init__(self, device, models=(), optimizers=()):
        self.device, self.models, self.optimizers = torch.device(device), models, optimizers
        self.metrics = {}
        self.live, self.peak, self.count = 0, 0, {}

    def _pack(self, t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.param_ptrs:
            self.count[ptr] = self.count.get(ptr, 0) + 1
            if self.count[ptr] == 1:
                self.live += t.untyped_storage().nbytes()
                self.peak = max(self.peak, self.live)
        return t, ptr

    def _unpack(self, packed):
        t, ptr = packed
        if ptr in self.count:
            self.count[ptr] -= 1
            if self.count[ptr] == 0:
                del self.count[ptr]
                self.live -= t.untyped_storage().nbytes()
        return t

    @contextlib.contextmanager
    def phase(self, name):
        """Time and memory of a phase; entering the same phase again within a step adds to its time."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.param_ptrs = {local(p).untyped_storage().data_ptr() for m in self.models for p in m.parameters()}
        self.live, self.peak, self.count = 0, 0, {}
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield
        m = self.metrics
        if cuda:
            torch.cuda.synchronize(self.device)
            key = f"memory/{name}_peak_bytes"
            m[key] = max(m.get(key, 0), torch.cuda.max_memory_allocated(self.device))
        else:
            m[f"memory/{name}_state_bytes"] = sum(state_bytes(self.models, self.optimizers).values())
            m[f"memory/{name}_rss_bytes"] = rss_bytes()
        key = f"memory/{name}_activation_bytes"
        m[key] = max(m.get(key, 0), self.peak)
        m[f"time/{name}"] = m.get(f"time/{name}", 0.0) + time.perf_counter() - t0

    def pop(self):
        out, self.metrics = self.metrics, {}
        return out


def parameter_counts(*models):
    """{"params/trained": ..., "params/frozen": ...} over these models, a parameter shared by two (a LoRA base) once."""
    params = {id(p): p for m in models for p in m.parameters()}
    return {
        "params/trained": sum(p.numel() for p in params.values() if p.requires_grad),
        "params/frozen": sum(p.numel() for p in params.values() if not p.requires_grad),
    }
