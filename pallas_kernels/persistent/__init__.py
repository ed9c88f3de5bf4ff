"""Ahead-of-time schedule of the persistent decode kernel (DESIGN.md sec. 4) and its CPU simulator.

Names are imported lazily, so `python -m pallas_kernels.persistent.schedule` runs its module only once.
"""
import importlib

_EXPORTS = {
    "format": ("Buffer", "Counter", "Kind", "Op", "Task", "Weight", "written_region"),
    "schedule": ("CorruptScheduleError", "Schedule", "ScheduleOptions", "compile_schedule", "load_or_compile",
                 "read_schedule", "save_schedule", "schedule_stats"),
    "simulate": ("DataflowError", "DeadlockError", "SimResult", "run_counters", "simulate_step"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
