"""`pallas_kernels._layout_names`: Mosaic GPU's layout inference names every value site exactly as upstream does
(so the solver sorts, and infers, the same), only from one SSA numbering of the module. Checked on a kernel lowered
for CUDA on the CPU with warpgroup semantics (the jax 0.11 default; jax 0.10 takes it when asked): the INDEX_TOPK
tile body of the persistent kernel at glm5_slice -- loops carrying register arrays, conditionals, reductions,
SMEM scalars and TMA (about 800 named sites)."""
import pytest

from glm_fast.config import load_config
from pallas_kernels import _compat, _layout_names
from pallas_kernels.persistent.format import Op
from pallas_kernels.persistent.kernel import abstract_step_args, gpu_candidates, persistent_step, pick_plan
from pallas_kernels.persistent.tiles import TileConfig
from tests.kernel_testing import lower_for_h200

li = pytest.importorskip("jax.experimental.mosaic.gpu.layout_inference")


def test_names_equal_upstream_names_on_a_persistent_tile_body(monkeypatch):
    assert _layout_names.install() and _layout_names.install()  # idempotent
    fast = li.ValueSite.__str__
    compared, differ = [], []

    def both(site):
        got = fast(site)
        if getattr(_layout_names._ACTIVE, "module", None) is not None:  # inside infer_layout: the fast path
            want = fast.upstream(site)
            compared.append(want)
            if got != want:
                differ.append((want, got))
        return got
    monkeypatch.setattr(li.ValueSite, "__str__", both)

    plan = pick_plan(load_config("glm5_slice").model, 1, gpu_candidates(num_sms=132), TileConfig(), False)
    with _compat.warpgroup_lowering():  # the kernel with jax 0.11's default lowering semantics on any jax
        lower_for_h200(lambda *a: persistent_step(plan, *a, interpret=False, ops=frozenset([Op.INDEX_TOPK])),
                       *abstract_step_args(plan, 4352))
    assert len(compared) > 500 and not differ, differ[:5]
