"""Persistent-kernel schedule (DESIGN.md sec. 4): structural invariants of the task lists, deadlock freedom under
random SM interleavings, the simulated step == the XLA backend (`main_cached`), records and the disk cache."""
import collections
import dataclasses
import time
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from glm_fast import load_config
from glm_fast.engine.forward import main_cached
from glm_fast.engine.ops import XLA
from pallas_kernels.persistent import (DeadlockError, Kind, Op, ScheduleOptions, Task, compile_schedule,
                                       load_or_compile, read_schedule, run_counters, schedule_stats, simulate_step,
                                       written_region)
from pallas_kernels.persistent.format import F_LAYER, F_NWAITS, F_OP, F_SIGNAL, F_WAITS, MAX_WAITS, RECORD_WIDTH
from pallas_kernels.persistent.schedule import ASSIGNMENTS
from tests.kernel_testing import prefilled

# Odd tiles so that every op has a ragged last tile (heads 3 + 1, top-K slots 6 + 6 + 4); 3 index chunks
# over ~40 rows (one shorter than top-K).
TINY_OPTIONS = ScheduleOptions(tile_n=24, attn_heads=3, attn_splits=3, index_chunks=3, index_align=8, num_sms=7)
CONTEXT = 40  # cached tokens before the step: > index_topk (16), so DSA really selects


@pytest.fixture(scope="module")
def tiny():
    return load_config("tiny").model


@pytest.fixture(scope="module", params=[(1, "mixed"), (3, "levels"), (3, "critical"), (3, "mixed")],
                ids=["T1", "T3-levels", "T3-critical", "T3"])
def tiny_schedule(request, tiny):
    t, assign = request.param
    return compile_schedule(tiny, t, dataclasses.replace(TINY_OPTIONS, assign=assign))


def _read_region(t, s, b):
    """The part of input buffer b that task t reads: a routed down task its slot of the experts' activations
    (its op group waits for that slot's up tiles only), every other task all of it."""
    if t.op == Op.SWIGLU_DOWN and b == t.inputs[0] and t.args[2] >= 0:
        return (t.args[2],)
    return ...


def _producers(s, b, region=...):
    """The counters of the tasks that write any element of buffer b's `region`."""
    out = set()
    for t in s.tasks:
        for ob, idx in written_region(t, s.buffers):
            if ob == b:
                mask = np.zeros(s.buffers[b].shape, bool)
                mask[idx] = True
                if mask[region].any():
                    out.add(t.signal)
    return out


def test_waits_match_counters_and_lists_are_topological(tiny_schedule):
    s = tiny_schedule
    signals = np.bincount(s.records[:, F_SIGNAL], minlength=len(s.counters))
    assert [c.target for c in s.counters] == signals.tolist()
    last_producer = {c: int(np.flatnonzero(s.records[:, F_SIGNAL] == c).max()) for c in range(len(s.counters))}
    for t in s.tasks:
        for c, target in t.waits:
            assert target == s.counters[c].target
            assert last_producer[c] < t.id, (t, s.counters[c].name)  # producers precede it in the global order
    lists = s.sm_lists()
    assert sorted(i for lst in lists for i in lst) == list(range(len(s.records)))
    assert all(lst == sorted(lst) for lst in lists)


def test_inputs_are_produced_by_ancestors_and_graph_is_acyclic(tiny_schedule):
    """What a task reads is produced by counters known complete when it starts: its own waits and those of the
    tasks before it on its SM (`_drop_known_waits` drops the repeats), transitively -- per task, so a routed down
    tile that waits for its own slot's up tiles only is checked against that slot's writers."""
    s = tiny_schedule
    tasks = s.tasks
    known = {}  # task id -> the counters its SM list has waited on up to and including it
    for row in s.sm_lists():
        seen = set()
        for i in row:
            seen |= {c for c, _ in tasks[i].waits}
            known[i] = set(seen)
    deps = {t.signal: set() for t in tasks}
    for t in tasks:
        deps[t.signal] |= known[t.id]
    # Kahn's algorithm over the counter graph visits every node iff it is acyclic.
    indeg = {o: len(d) for o, d in deps.items()}
    users = {}
    for o, d in deps.items():
        for p in d:
            users.setdefault(p, []).append(o)
    frontier, seen = [o for o, n in indeg.items() if n == 0], []
    while frontier:
        o = frontier.pop()
        seen.append(o)
        for u in users.get(o, ()):
            indeg[u] -= 1
            if indeg[u] == 0:
                frontier.append(u)
    assert len(seen) == len(deps)
    ancestors = {}
    for o in seen:  # a topological order
        ancestors[o] = set().union(*([deps[o]] + [ancestors[p] for p in deps[o]]))
    producers = {}
    for t in tasks:
        reach = known[t.id].union(*(ancestors[c] for c in known[t.id]))
        for b in t.inputs:
            if b >= 0 and s.buffers[b].kind != Kind.INPUT:
                region = _read_region(t, s, b)
                key = (b, region if region is ... else tuple(region))
                if key not in producers:
                    producers[key] = _producers(s, b, region)
                assert producers[key] <= reach, (t, s.buffers[b].name)


def test_routed_down_tiles_wait_for_their_own_slot_and_the_combine_waits_once(tiny):
    """Each expert slot's up tiles signal a counter of their own; a slot's down tiles (one shared counter for all
    slots) wait on it alone, so they run while other slots' up tiles stream; the combine waits once for them."""
    s = compile_schedule(tiny, 2, dataclasses.replace(TINY_OPTIONS, assign="levels"))
    names = [c.name for c in s.counters]
    slots = {t.args[2] for t in s.tasks if t.op == Op.SWIGLU_UP and t.layer == 1 and t.args[2] >= 0}
    assert len(slots) > 1
    waited = set()  # (slot, up counter) pairs of the down tiles' waits (an SM's repeated waits are dropped)
    for t in s.tasks:
        if t.layer == 1 and t.op == Op.SWIGLU_DOWN and t.args[2] >= 0:
            assert names[t.signal] == "layers/1/experts_down"
            waited |= {(t.args[2], names[c]) for c, _ in t.waits if "experts_up" in names[c]}
    assert waited == {(slot, f"layers/1/experts_up_{slot}") for slot in slots}
    down = names.index("layers/1/experts_down")
    col_tiles = -(-tiny.hidden_size // TINY_OPTIONS.tile_n)
    assert s.counters[down].target == sum(t.signal == down for t in s.tasks) == len(slots) * col_tiles
    combine = [[names[c] for c, _ in t.waits] for t in s.tasks if names[t.signal] == "layers/1/combine"]
    assert max(w.count("layers/1/experts_down") for w in combine) == 1


def test_every_output_element_is_written_exactly_once(tiny_schedule):
    s = tiny_schedule
    counts = {i: np.zeros(b.shape, int) for i, b in enumerate(s.buffers) if b.kind in (Kind.SCRATCH, Kind.OUTPUT)}
    for t in s.tasks:
        for b, idx in written_region(t, s.buffers):
            counts[b][idx] += 1
    for b, c in counts.items():
        assert (c == 1).all(), (s.buffers[b].name, np.unique(c))


def test_schedule_covers_dense_moe_full_and_shared_layers(tiny, tiny_schedule):
    s = tiny_schedule
    layers_of = lambda op: {t.layer for t in s.tasks if t.op == op}  # noqa: E731
    assert tiny.layer_indexer_types == ("full", "shared", "full", "shared")
    assert layers_of(Op.INDEX_SCORE) == layers_of(Op.INDEX_TOPK) == {0, 2}
    assert layers_of(Op.ATTN) == {0, 1, 2, 3}
    assert layers_of(Op.ROUTER_SELECT) == {1, 2, 3}  # layer 0 is dense
    dense_down = {t.layer for t in s.tasks if t.op == Op.SWIGLU_DOWN and t.args[3] < 0}
    assert dense_down == {0}
    # Shared layers attend over the previous full layer's top-k (its producer is an ancestor: tested above).
    topk_of = {t.layer: s.buffers[t.inputs[4]].name for t in s.tasks if t.op == Op.ATTN}
    assert topk_of == {0: "layers/0/topk_idx", 1: "layers/0/topk_idx", 2: "layers/2/topk_idx",
                       3: "layers/2/topk_idx"}


@pytest.mark.parametrize("t,per_token", [(1, 64), (4, 32), (5, 16)])
def test_topk_merge_splits_per_token_and_part(t, per_token):
    """glm5_slice (K = 2048): a full layer's INDEX_TOPK tasks are one per (token, part), index_topk_parts (64) parts
    per token while T * 64 <= index_topk_tasks (128), else the largest divisor of K under 128 / T: the tokens of a
    verification step merge on different SMs at once."""
    s = compile_schedule(load_config("glm5_slice").model, t, ScheduleOptions())
    layer = min(u.layer for u in s.tasks if u.op == Op.INDEX_TOPK)
    args = sorted(u.args[:3] for u in s.tasks if u.op == Op.INDEX_TOPK and u.layer == layer)
    assert args == sorted((j, per_token, q) for q in range(t) for j in range(per_token))


def test_records_round_trip(tiny_schedule):
    s = tiny_schedule
    for rec in s.records:
        assert (Task.decode(rec).encode() == rec).all()
    sm = s.sm_records()
    assert sm.shape == (TINY_OPTIONS.num_sms, s.sm_tasks.shape[1], RECORD_WIDTH) and sm.dtype == np.int32
    pad = s.sm_tasks < 0
    assert (sm[pad][:, F_OP] == Op.NOP).all() and (sm[~pad][:, F_OP] != Op.NOP).all()


def _step(cfg, seed, t):
    """`prefilled` with CONTEXT prompt tokens; the step's tokens / positions as [T] (the simulator's form)."""
    model, caches, tokens, pos = prefilled(cfg, seed, CONTEXT, t)
    return model, caches, tokens[0], pos[0]


@pytest.mark.parametrize("t,seed,assign", [(1, 0, "mixed"), (1, 1, "levels"), (3, 0, "mixed"), (3, 2, "levels"),
                                           (3, 1, "critical")])
def test_simulated_step_matches_xla_backend(tiny, t, seed, assign):
    """Random SM interleaving (seeded) of the schedule's tile references == main_cached (float32): logits within
    1e-5 of max |logit|, every cache row within 1e-5."""
    model, caches, tokens, pos = _step(tiny, seed, t)
    expected, _, expected_caches = main_cached(model, caches, tokens[None], pos[None],
                                               jnp.ones((1, t), bool), XLA)
    sched = compile_schedule(tiny, t, dataclasses.replace(TINY_OPTIONS, assign=assign))
    got = simulate_step(sched, model, caches, tokens, pos, seed=seed)
    assert np.isfinite(np.asarray(got.logits)).all()
    scale = float(jnp.abs(expected).max())
    assert scale > 0
    err = float(jnp.abs(got.logits - expected[0]).max()) / scale
    assert err < 1e-5, err
    assert len(got.order) == len(sched.records) and got.order != sorted(got.order)  # really interleaved
    for layer, (a, b) in enumerate(zip(got.caches, expected_caches)):
        for field in ("c_kv", "k_pe", "index_k"):
            x, y = getattr(a, field), getattr(b, field)
            assert (x is None) == (y is None)
            if x is not None:
                assert float(jnp.abs(y[0, pos]).max()) > 0  # the step wrote real rows
                np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, err_msg=f"{layer} {field}")


def test_dsa_really_selects_in_the_simulated_step(tiny):
    """At CONTEXT > index_topk the selection must drop rows: a step whose top-k buffer is all-valid and covers
    fewer rows than are visible (guards the equality test above against a degenerate dense attention)."""
    model, caches, tokens, pos = _step(tiny, 0, 1)
    sched = compile_schedule(tiny, 1, TINY_OPTIONS)
    from pallas_kernels.persistent.simulate import _Machine
    machine = _Machine(sched, model, caches, tokens, pos)
    run_counters(sched, 0, machine.run)
    valid = next(i for i, b in enumerate(sched.buffers) if b.name == "layers/0/topk_valid")
    assert machine.bufs[valid].sum() == tiny.index_topk < CONTEXT + 1


@pytest.mark.parametrize("t,assign", [(1, "levels"), (1, "mixed"), (4, "mixed"), (1, "list"), (1, "critical"),
                                      (4, "critical")])
def test_glm5_slice_random_interleavings_never_deadlock(t, assign):
    s = compile_schedule(load_config("glm5_slice").model, t, ScheduleOptions(num_sms=132, assign=assign))
    lists = s.sm_lists()
    assert sorted(i for lst in lists for i in lst) == list(range(len(s.records)))
    assert all(lst == sorted(lst) for lst in lists)  # every list a subsequence of the global order
    assert s.meta["model_us"] > 0
    orders = [run_counters(s, seed) for seed in range(3)]
    assert all(len(o) == len(s.records) for o in orders)
    assert orders[0] != orders[1]


def test_list_assignments_stay_balanced_and_beat_levels_in_their_model():
    """The list assignments keep glm5's bytes per SM balanced (a level's leftover tasks go to the SM with the
    fewest bytes among those free) and, judged by the cost model, finish before LPT per level: the critical
    order most of all (it no longer queues each layer's indexer behind q_b tiles); "mixed" (LPT for the weight
    tiles, list scheduling for the latency-bound tasks) also before plain "levels"."""
    cfg = load_config("glm5_slice").model
    by = {a: compile_schedule(cfg, 1, ScheduleOptions(num_sms=132, assign=a)) for a in ASSIGNMENTS}
    for a in ASSIGNMENTS:
        assert schedule_stats(by[a])["imbalance"] < 1.05, a
    assert by["critical"].meta["model_us"] < by["list"].meta["model_us"] <= by["levels"].meta["model_us"]
    assert by["mixed"].meta["model_us"] < by["levels"].meta["model_us"]
    with pytest.raises(ValueError, match="one of 'levels', 'list', 'critical'"):
        ScheduleOptions(assign="greedy")
    with pytest.raises(ValueError, match="op_us"):
        ScheduleOptions(op_us=(("ATTN", -1.0),))
    with pytest.raises(ValueError, match="op_us"):
        ScheduleOptions(op_us=(("ATTENTION", 30.0),))


def _sm_ops(s) -> list[list[tuple[str, int]]]:
    """Each SM's list as (op group name without its layer prefix, layer) pairs, in run order."""
    names = [c.name.rsplit("/", 1)[-1] for c in s.counters]
    return [[(names[s.records[t, F_SIGNAL]], s.records[t, F_LAYER]) for t in row[row >= 0]] for row in s.sm_tasks]


def test_hoisted_and_critical_orders_run_the_indexer_before_q_b_tiles():
    """Why "critical" and `ScheduleOptions.hoist` exist: in plain level order (LPT per level) the SMs that score a
    layer's index keys first run their share of that layer's q_b tiles (one level earlier, and only ABSORB -> ATTN
    needs them); with INDEX_SCORE hoisted into its producers' level (the default) or in bottom-level order no SM
    runs a q_b tile of a layer before its INDEX_SCORE task of that layer."""
    cfg = load_config("glm5_slice").model

    def q_b_before_score(assign, **options):
        found = scores = 0
        for ops in _sm_ops(compile_schedule(cfg, 1, ScheduleOptions(num_sms=132, assign=assign, **options))):
            for i, (name, layer) in enumerate(ops):
                if name == "index_score":
                    scores += 1
                    found += ("q_b", layer) in ops[:i]
        assert scores == cfg.num_hidden_layers * ScheduleOptions().index_chunks
        return found

    assert q_b_before_score("levels", hoist=()) > 0
    assert q_b_before_score("levels") == 0
    assert q_b_before_score("critical") == 0
    with pytest.raises(ValueError, match="hoist: 'INDEX' is not an Op name"):
        ScheduleOptions(hoist=("INDEX",))


def test_mixed_keeps_a_hoisted_tasks_sm_clear_of_its_level_weight_tiles():
    """Under "mixed" an SM that scores a layer's index keys (hoisted into the level of the indexer's q and q_b
    tiles) takes no weight tiles of that level, so that the layer's top-K merge can follow the scores on it at once;
    under "levels" those SMs do take q_b tiles after their INDEX_SCORE task."""
    cfg = load_config("glm5_slice").model

    def q_b_after_score(assign):
        found = 0
        for ops in _sm_ops(compile_schedule(cfg, 1, ScheduleOptions(num_sms=132, assign=assign))):
            for i, (name, layer) in enumerate(ops):
                found += name == "index_score" and ("q_b", layer) in ops[i + 1:]
        return found

    assert q_b_after_score("levels") > 0
    assert q_b_after_score("mixed") == 0


def test_a_task_before_its_producer_in_one_list_deadlocks(tiny_schedule):
    """The detector fires and names the blocked task: move the last task that still waits itself (an LM-head
    tile or the sum of a split-K one, which depends on everything; its list-mates' waits were dropped as known) to
    the front of the list that holds the embedding."""
    s = tiny_schedule
    lists = s.sm_lists()
    last = max(t for t in range(len(s.records)) if s.records[t, F_NWAITS] > 0)
    op = Op(s.records[last, F_OP])
    assert op in (Op.GEMV, Op.MOE_COMBINE) and s.records[last, F_LAYER] == -1
    owner = next(i for i, lst in enumerate(lists) if last in lst)
    lists[owner].remove(last)
    embed = next(i for i, lst in enumerate(lists) if 0 in lst)
    lists[embed].insert(0, last)
    with pytest.raises(DeadlockError, match=f"task {last} \\({op.name}"):
        run_counters(s, 0, lists=lists)


def test_known_waits_are_dropped_per_list(tiny_schedule):
    """No task waits on a counter that an earlier task of its SM list already waited for (directly), and every
    counter's waiter count matches the records."""
    s = tiny_schedule
    waits = s.records[:, F_WAITS:F_WAITS + 2 * MAX_WAITS:2]
    for lst in s.sm_lists():
        seen: set = set()
        for t in lst:
            mine = {int(c) for c in waits[t, :s.records[t, F_NWAITS]]}
            assert not mine & seen, (t, mine & seen)
            seen |= mine
    assert [c.waiters for c in s.counters] == np.bincount(waits[waits >= 0], minlength=len(s.counters)).tolist()


def test_compile_is_deterministic_and_cached(tiny, tmp_path):
    a, b = compile_schedule(tiny, 3, TINY_OPTIONS), compile_schedule(tiny, 3, TINY_OPTIONS)
    assert (a.records == b.records).all() and (a.sm_tasks == b.sm_tasks).all()
    s1, info1 = load_or_compile(tiny, 3, TINY_OPTIONS, "H200", tmp_path)
    s2, info2 = load_or_compile(tiny, 3, TINY_OPTIONS, "H200", tmp_path)
    assert (info1["source"], info2["source"]) == ("compiled", "loaded")
    assert (s2.records == a.records).all() and s2.counters == a.counters and s2.buffers == a.buffers
    _, other = load_or_compile(tiny, 3, TINY_OPTIONS, "B200", tmp_path)
    _, more_sms = load_or_compile(tiny, 3, ScheduleOptions(**{**TINY_OPTIONS.__dict__, "num_sms": 8}), "H200",
                                  tmp_path)
    assert len({info1["path"], other["path"], more_sms["path"]}) == 3


def test_corrupt_cache_file_is_rebuilt_with_a_warning(tiny, tmp_path):
    s, info = load_or_compile(tiny, 1, TINY_OPTIONS, "H200", tmp_path)
    data = open(info["path"], "rb").read()
    open(info["path"], "wb").write(data[: len(data) // 2])
    with pytest.warns(RuntimeWarning, match="rebuilding"):
        s2, info2 = load_or_compile(tiny, 1, TINY_OPTIONS, "H200", tmp_path)
    assert info2["source"] == "compiled" and (s2.records == s.records).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_or_compile(tiny, 1, TINY_OPTIONS, "H200", tmp_path)[1]["source"] == "loaded"
    assert (read_schedule(info["path"]).sm_tasks == s.sm_tasks).all()


def test_glm5_schedule_compiles_fast_and_is_balanced():
    cfg = load_config("glm5").model
    start = time.perf_counter()
    s = compile_schedule(cfg, 1)
    assert time.perf_counter() - start < 10
    st = schedule_stats(s)
    assert st["imbalance"] < 1.02
    dense, moe = cfg.layer_mlp_types.count("dense"), cfg.layer_mlp_types.count("sparse")
    # DESIGN.md sec. 4: ~12 dependency hops per MoE layer, + 1 for the split-K first projections' combine
    assert st["hops_per_layer_max"] == 13
    assert st["critical_path_hops"] <= 13 * (dense + moe) + 2
    no_split = schedule_stats(compile_schedule(cfg, 1, ScheduleOptions(proj_splits=1)))
    assert no_split["hops_per_layer_max"] == 12
    assert st["tasks_by_op"]["ATTN"] == cfg.num_hidden_layers * cfg.num_attention_heads // 8 * 8


def test_lm_head_tiles_beyond_whole_rounds_are_split_k():
    """glm5_slice: the lm_head's 2420 column tiles on 132 SMs leave 44 beyond 18 whole rounds; those run as
    head_splits = 3 split-K parts (132 tasks) and 44 sums into the logits, so every SM streams the same lm_head
    bytes, where head_splits = 1 leaves 44 SMs a 19th tile. tiny (22 ragged tiles of 24 columns on 7 SMs) splits
    its one extra tile in 2 parts (hidden 128: K / P a multiple of 64); the simulator and the interpret-mode
    kernel tests run that schedule."""
    from pallas_kernels.persistent.format import F_BYTES
    cfg = load_config("glm5_slice").model

    def head(options):
        s = compile_schedule(cfg, 1, options)
        per_sm = [sum(s.records[t, F_BYTES] for t in lst if s.records[t, F_LAYER] == -1) for lst in s.sm_lists()]
        return np.array(per_sm), collections.Counter(s.counters[c].name for c in s.records[:, F_SIGNAL])
    per_sm, count = head(ScheduleOptions(num_sms=132))
    assert (count["lm_head"], count["lm_head_extra"], count["lm_head_extra_sum"]) == (2376, 132, 44)
    assert per_sm.max() / per_sm.min() < 1.001
    per_sm, count = head(ScheduleOptions(num_sms=132, head_splits=1))
    assert count["lm_head"] == 2420 and "lm_head_extra" not in count
    assert per_sm.max() / per_sm.min() > 1.05  # 19 tiles against 18
    tiny = compile_schedule(load_config("tiny").model, 1, TINY_OPTIONS)
    extra = [b for b in tiny.buffers if b.name == "lm_head_extra_parts"]
    assert [b.shape for b in extra] == [(2, 1, 24)]


def test_tasks_with_the_longer_chain_after_them_run_first_on_each_sm():
    """Within a level the op with the longer dependency chain after it goes first in every SM's list: at
    glm5_slice each SM runs its indexer q tiles (-> INDEX_SCORE -> INDEX_TOPK -> ATTN) before its q_b tiles
    (-> ABSORB -> ATTN), and the router's tile before the shared expert's up tiles of the same layer."""
    s = compile_schedule(load_config("glm5_slice").model, 1, ScheduleOptions(num_sms=132))
    names = [c.name.rsplit("/", 1)[-1] for c in s.counters]
    checked = 0
    for row in s.sm_tasks:
        ops = [(names[s.records[t, F_SIGNAL]], s.records[t, F_LAYER]) for t in row[row >= 0]]
        for first, then in (("index_q", "q_b"), ("router", "shared_up")):
            for layer in {lay for name, lay in ops if name == first}:
                a = [i for i, o in enumerate(ops) if o == (first, layer)]
                b = [i for i, o in enumerate(ops) if o == (then, layer)]
                if a and b:
                    assert max(a) < min(b), (first, then, layer, ops)
                    checked += 1
    assert checked


def test_cli_prints_the_chosen_schedule(tmp_path, capsys):
    """`python -m pallas_kernels.persistent.schedule CONFIG --attn HxS --assign A`: the schedule of those options
    (its model makespan, the figure the README quotes for glm5_slice at 64x32)."""
    from pallas_kernels.persistent.schedule import main
    args = ["tiny", "--tokens", "1", "--tile-n", "24", "--num-sms", "7", "--attn", "3x3", "--cache-dir", str(tmp_path)]
    model_us = {}
    for assign in ("levels", "critical"):
        main(args + ["--assign", assign])
        line = next(ln for ln in capsys.readouterr().out.splitlines() if "model_us" in ln)
        model_us[assign] = float(line.split(":")[1])
    s = compile_schedule(load_config("tiny").model, 1,
                         ScheduleOptions(tile_n=24, num_sms=7, attn_heads=3, attn_splits=3, assign="critical"))
    assert model_us["critical"] == pytest.approx(s.meta["model_us"], abs=1e-3)
    assert model_us["critical"] != model_us["levels"]
