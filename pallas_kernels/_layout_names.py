"""Faster Mosaic GPU layout inference: each value site's name from one SSA numbering of the module, not one per name.

jax 0.11 lowers Pallas Mosaic GPU kernels with warpgroup semantics, which runs Mosaic's Python layout inference
(`jax.experimental.mosaic.gpu.layout_inference.infer_layout`) at `jit(...).lower()`. Its constraint solver sorts
variables by their names (`constraints.compute_transitively_equal_vars`: `sorted(all_vars, key=str)`), and a name
(`ValueSite.__str__`) is the prefix of `str(operation)`. Printing one operation that way verifies and numbers the
*whole module* first (MLIR's `Operation::print` builds an `AsmState` from the top-level op), so naming costs O(module)
per variable: O(module^2) in all. On the persistent decode kernel (glm5_slice) that sort was 43% of a 364 s lowering
on the H200 (`lowering_profile` in experiments/results/bench_persistent_glm5_slice_critical.json).

`install()` makes the names identical but cheap: while `infer_layout` runs, one `ir.AsmState` of its module (built
on the first name) numbers every value, each operation is printed once through it, and upstream's own
`ValueSite.__str__` formats the name from that text. Same strings, so the same sort order and the same layouts
(tests/test_layout_names.py compares them on a kernel of this repository). Outside `infer_layout` names are
upstream's. Idempotent; a no-op on a jax without these hooks.
"""
from __future__ import annotations

import io
import threading
import types

_ACTIVE = threading.local()  # .module: the module infer_layout is working on (None outside it), .asm, .text


class _Printed:
    """Stands in for an operation inside upstream's `ValueSite.__str__`: str() is its already-printed text."""

    def __init__(self, text: str):
        self.text = text

    def __str__(self):
        return self.text


def install() -> bool:
    """Patch Mosaic GPU's layout inference (see the module docstring); True when the hooks were found."""
    try:
        import jax.experimental.mosaic.gpu as mgpu
        from jax._src.lib.mlir import ir
        from jax.experimental.mosaic.gpu import layout_inference as li
    except ImportError:
        return False
    site, infer = getattr(li, "ValueSite", None), getattr(li, "infer_layout", None)
    if site is None or infer is None or not hasattr(li, "_op_name_regex"):
        return False
    if getattr(infer, "_glm_fast", False):
        return True
    upstream_str = site.__str__

    def site_str(self):
        module = getattr(_ACTIVE, "module", None)
        if module is None:
            return upstream_str(self)
        text = _ACTIVE.text.get(self.operation)
        if text is None:
            if _ACTIVE.asm is None:
                _ACTIVE.asm = ir.AsmState(module.operation)
            buf = io.StringIO()
            self.operation.print(state=_ACTIVE.asm, file=buf)
            text = li._op_name_regex.match(buf.getvalue()).group(0)  # all of the text upstream's name reads
            _ACTIVE.text[self.operation] = text
        return upstream_str(types.SimpleNamespace(operation=_Printed(text), type=self.type, index=self.index))

    def infer_layout(module, *args, **kwargs):
        _ACTIVE.module, _ACTIVE.asm, _ACTIVE.text = module, None, {}
        try:
            return infer(module, *args, **kwargs)
        finally:
            _ACTIVE.module, _ACTIVE.asm, _ACTIVE.text = None, None, {}

    infer_layout._glm_fast = True
    site_str.upstream = upstream_str  # (tests compare the two)
    site.__str__ = site_str
    li.infer_layout = infer_layout
    if getattr(mgpu, "infer_layout", None) is infer:  # Pallas calls it through the package namespace
        mgpu.infer_layout = infer_layout
    return True
