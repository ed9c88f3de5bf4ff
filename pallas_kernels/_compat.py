"""Version shims for Pallas Mosaic GPU across jax 0.10.2 (CI, CPU) and 0.11.2 (the H200 machine).

Keep this tiny. Public names:
  `InterpretGPUParams`    the GPU interpret-mode parameter class (public `plgpu.InterpretGPUParams` on 0.11,
                          private `jax._src.pallas.mosaic_gpu.interpret.params` on 0.10).
  `interpret_params(**kw)` an `InterpretGPUParams` instance (kwargs passed through, e.g. `detect_races=True`).
  `resolve_interpret(v)`  maps a kernel's `interpret` argument (False / True / InterpretGPUParams) to what
                          `plgpu.kernel(..., interpret=...)` takes: None or an InterpretGPUParams.
  `reset_interpret_state()` clears GPU interpret mode's global state (needed after a kernel raised inside it).
  `transpose_ref(ref, perm)` a transposed view of a GPU ref (plain traced Ref or TransformedRef); replaces
                          `plgpu.transpose_ref`, whose `hasattr(ref, "memory_space")` check raises ValueError
                          on a traced Ref in jax 0.11 (tracers no longer forward plain aval attributes).
  `interpret_mesh()`      context manager: an abstract H100-like GPU mesh, so kernels that query the device
                          (e.g. SM count) trace on a CPU host, as in jax's tests/pallas/gpu_pallas_interpret_test.py.
  `fence_proxy_async_global()` PTX `fence.proxy.async.global` (Pallas exposes only the SMEM proxy fence,
                          `plgpu.commit_smem`), via `plgpu.inline_mgpu` as jax's own `helpers.inline_ptx` does.
  `stamp(ref, column)`    one thread per CTA stores (globaltimer's low 32 bits in ns, the SM's clock) into
                          `ref[CTA index, column:column + 2]` of an int32 GMEM ref (the kernel's launch window;
                          column may be traced: the task stamps).
  `warpgroup_lowering()`  context manager: `plgpu.kernel` calls inside it lower with warpgroup semantics (jax
                          0.11's default, which runs Mosaic's layout inference; jax 0.10 takes it when asked), to
                          reproduce the device's lowering on a CPU host.
"""
from __future__ import annotations

import contextlib

import jax
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax._src.state import types as _state_types

try:  # jax >= 0.11
    InterpretGPUParams = plgpu.InterpretGPUParams  # type: ignore[attr-defined]
except AttributeError:  # jax 0.10.x
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # type: ignore[no-redef]


def interpret_params(**kwargs) -> "InterpretGPUParams":
    """GPU interpret-mode parameters (runs Mosaic GPU kernels on the CPU, simulating SMEM/TMA/barriers)."""
    return InterpretGPUParams(**kwargs)


def resolve_interpret(interpret):
    """False/None -> None (compile for the GPU); True -> default InterpretGPUParams; params -> themselves."""
    if interpret is None or interpret is False:
        return None
    if interpret is True:
        return InterpretGPUParams()
    if isinstance(interpret, InterpretGPUParams):
        return interpret
    raise TypeError(f"interpret must be a bool or InterpretGPUParams, got {type(interpret).__name__}: {interpret!r}")


def reset_interpret_state() -> None:
    """Clear GPU interpret mode's process-wide state (call after an exception raised inside interpret mode)."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
    except ImportError:  # layout moved: nothing we can reset
        return
    gpu_callbacks.reset_gpu_interpret_mode_state()


@contextlib.contextmanager
def interpret_mesh(device_kind: str = "NVIDIA H100 80GB HBM3", num_cores: int = 8):
    """An abstract GPU mesh for tracing on a CPU host (kernels that read the SM count see `num_cores`)."""
    device = jax.sharding.AbstractDevice(device_kind=device_kind, platform="gpu", num_cores=num_cores)
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=device)):
        yield


def _ref_memory_space(ref):
    """The memory space of a (possibly transformed) ref, read from its type, never from a tracer attribute."""
    base = ref.ref if isinstance(ref, _state_types.TransformedRef) else ref
    try:
        return jax.typeof(base).memory_space
    except Exception:  # noqa: BLE001 - best effort, only used for the TMEM check
        return None


def transpose_ref(ref, permutation):
    """`ref` viewed with its dims permuted (`plgpu.transpose_ref` semantics: a TransposeTransform appended).

    jax 0.10 and 0.11 `plgpu.transpose_ref` is `assert hasattr(ref, "memory_space"); ...; ref.transpose(perm)`;
    on 0.11 `hasattr` raises ValueError for a traced Ref (e.g. one from `pl.run_scoped`), so we build the same
    `TransformedRef` directly: `TransformedRef(ref, ()).transpose(perm)` is exactly what `AbstractRef.transpose`
    does, and `TransformedRef.transpose` appends a `TransposeTransform` to an existing transformed ref.
    """
    perm = tuple(int(p) for p in permutation)
    if str(_ref_memory_space(ref)) == "tmem":
        raise ValueError("Can't transpose a TMEM reference.")
    if not isinstance(ref, _state_types.TransformedRef):
        ref = _state_types.TransformedRef(ref, ())
    return ref.transpose(perm)


def fence_proxy_async_global() -> None:
    """Orders this thread's GMEM accesses through the async proxy (TMA) with those through the generic proxy
    (plain loads / stores, the semaphores' release / acquire): without it, GMEM written by a TMA store need not
    be visible to a generic load that another CTA makes after acquiring the signal, nor generic stores to a
    TMA load (PTX ISA, memory consistency model: proxies). GPU only (interpret mode has no proxies)."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import llvm

    @plgpu.inline_mgpu()
    def fence(_):
        llvm.inline_asm(ir.Type.parse("!llvm.void"), [], "fence.proxy.async.global;", "", has_side_effects=True)

    fence()


def stamp(ref, column) -> None:
    """ref[CTA, column] = globaltimer's low 32 bits (ns, one clock for all SMs; wraps every 4.3 s),
    ref[CTA, column + 1] = %clock (this SM's cycles): where a launch's CTAs start and end on a shared clock, and
    the SM clock rate between two stamps. column: an int or an int32 scalar (a task's list position,
    `persistent_step(task_stamps=True)`). GPU only (no interpret mode).

    Every thread stores its own reading into the same two cells (the threads read within nanoseconds of each
    other; one of them lands): a store by thread 0 alone sits in a branch, and a divergent branch between a task's
    wgmmas made ptxas serialize every wgmma of the kernel (C7520, "compiler-inserted WG.AR in divergent path";
    session 23: 2.10 -> 2.47 ms with the task stamps)."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, gpu, memref
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    static = isinstance(column, int)  # (the launch window's stamps: a constant column, no scalar operand)

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),) if static else (plgpu.RefType(), plgpu.Layout.WG_SPLAT(())))
    def store(_ctx, ref_m, *column_fa):
        i32, index = ir.IntegerType.get_signless(32), ir.IndexType.get()
        cta = gpu.block_id(gpu.Dimension.x)
        col = mgpu_utils.c(column, i32) if static else column_fa[0].registers.item()
        memref.store(mgpu_utils.globaltimer("low"), ref_m, [cta, arith.index_cast(index, col)])
        memref.store(mgpu_utils.clock(), ref_m, [cta, arith.index_cast(index, arith.addi(col, mgpu_utils.c(1, i32)))])

    store(*((ref,) if static else (ref, column)))


@contextlib.contextmanager
def warpgroup_lowering():
    """`plgpu.kernel` with lowering_semantics=Warpgroup inside the block (see the module docstring)."""
    import dataclasses
    real = plgpu.kernel

    def kernel(*args, **kwargs):
        params = kwargs.get("compiler_params") or plgpu.CompilerParams()
        kwargs["compiler_params"] = dataclasses.replace(params, lowering_semantics=plgpu.LoweringSemantics.Warpgroup)
        return real(*args, **kwargs)
    plgpu.kernel = kernel
    try:
        yield
    finally:
        plgpu.kernel = real
