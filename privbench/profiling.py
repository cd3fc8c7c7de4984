"""Memory held by tensors through one PyTorch training step, section by section.

:class:`StepMeter` follows the bytes that tensors hold while named sections
of a step run (the phases of the step, and sections nested in them):

- CUDA: the caching allocator's own counters (``memory_allocated`` and
  ``max_memory_allocated``, the peak reset at every section boundary).
- CPU: PyTorch has no allocator counters on CPU, so the step runs under the
  PyTorch profiler with ``profile_memory=True``: every allocation and free of
  the CPU allocator is an event with its time and size. The level at any
  moment is what the run's tensors held when the step started (counted by
  :func:`held_bytes`) plus the events so far.

:func:`held_bytes` splits what is held into named components (parameters,
gradients, ...), counting each storage once, and :class:`SavedTensors`
finds the tensors autograd keeps for the backward pass without keeping them
alive itself.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import itertools
import weakref
from typing import Iterable, Iterator

import torch

_ANNOTATION = "privbench::"


@dataclasses.dataclass
class Section:
    name: str
    before: int  # bytes held when the section started
    after: int  # bytes held when it ended
    peak: int  # most bytes held at any moment inside it


def held_bytes(groups: dict[str, Iterable[torch.Tensor]]) -> dict[str, int]:
    """Bytes held per group; a storage shared by several tensors counts once, in the first group naming it."""
    seen: set = set()
    totals = {}
    for name, tensors in groups.items():
        total = 0
        for tensor in tensors:
            storage = tensor.untyped_storage()
            key = (storage.device, storage.data_ptr())
            if storage.nbytes() and key not in seen:
                seen.add(key)
                total += storage.nbytes()
        totals[name] = total
    return totals


class SavedTensors:
    """Within the block, note every tensor autograd saves for backward (by weak reference)."""

    def __init__(self) -> None:
        self._refs: list = []

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self._refs.append(weakref.ref(tensor))
        return tensor

    @contextlib.contextmanager
    def tracking(self) -> Iterator[None]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor):
            yield

    def alive(self) -> list[torch.Tensor]:
        """The saved tensors autograd still holds (those of a finished backward pass are gone)."""
        return [t for t in (ref() for ref in self._refs) if t is not None]


class StepMeter:
    """Measure sections of one step; ``start_bytes`` is what is held at the start (CPU only)."""

    def __init__(self, device: torch.device, start_bytes: int = 0) -> None:
        self.device = device
        self.sections: list[Section] = []
        if device.type == "cuda":
            self.source = "CUDA caching allocator (torch.cuda.memory_allocated / max_memory_allocated)"
            self._open: list[list] = []  # [name, before, peak so far] of the sections now running
        else:
            self.source = ("PyTorch profiler memory events of the CPU allocator, added to the bytes of the "
                           "run's tensors at the start of the step")
            self._start_bytes = start_bytes
            self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                    profile_memory=True)

    # ------------------------------------------------------------------ both devices
    def __enter__(self) -> "StepMeter":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.start = self._start_bytes
            self._profiler.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type != "cuda":
            self._profiler.__exit__(*exc)
            if exc[0] is None:
                self._read_cpu_events()

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        if self.device.type == "cuda":
            with self._cuda_section(name):
                yield
        else:
            with torch.profiler.record_function(_ANNOTATION + name):
                yield

    # ------------------------------------------------------------------ CUDA
    def _fold_peak(self) -> None:
        """Credit the allocator's peak since the last reset to every open section, then reset it."""
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        for entry in self._open:
            entry[2] = max(entry[2], peak)
        torch.cuda.reset_peak_memory_stats(self.device)

    @contextlib.contextmanager
    def _cuda_section(self, name: str) -> Iterator[None]:
        self._fold_peak()
        before = torch.cuda.memory_allocated(self.device)
        entry = [name, before, before]
        self._open.append(entry)
        index = len(self.sections)
        self.sections.append(Section(name, before, before, before))  # placeholder keeps start order
        try:
            yield
        finally:
            self._fold_peak()
            self._open.pop()
            self.sections[index] = Section(name, before, torch.cuda.memory_allocated(self.device), entry[2])

    # ------------------------------------------------------------------ CPU
    def _read_cpu_events(self) -> None:
        events = self._profiler.profiler.kineto_results.events()
        memory = sorted((e.start_ns(), e.nbytes()) for e in events
                        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
        times = [t for t, _ in memory]
        levels = list(itertools.accumulate((n for _, n in memory), initial=self.start))  # levels[i]: after i events
        annotations = sorted((e.start_ns(), e.start_ns() + e.duration_ns(), e.name()[len(_ANNOTATION):])
                             for e in events if e.name().startswith(_ANNOTATION))
        for start, end, name in annotations:
            first, last = bisect.bisect_left(times, start), bisect.bisect_right(times, end)
            before, after = levels[first], levels[last]
            self.sections.append(Section(name, before, after, max(levels[first:last + 1])))
