"""`pallas_kernels.persistent.ptxas` (bench_persistent.py / persistent_lowering.py --ptxas): the compiler's report
on a kernel (registers, stack frame, spills, warnings) read from ptxas' own output -- a real ptxas run where this
machine has one, Mosaic's log among a program's other output, and the fd-level capture of a child's output."""
import os
import shutil
import subprocess

import numpy as np
import pytest

from pallas_kernels.persistent import ptxas




def _ptx(frame_bytes: int, min_ctas: int) -> str:
    """Two sm_90a entry functions: `plain` (no stack), `framed` (a local array of frame_bytes, dynamically indexed
    so it stays in local memory, and a .minnctapersm that ptxas ignores with a warning at 1024 threads)."""
    return f"""
.version 8.0
.target sm_90a
.address_size 64
.visible .entry plain(.param .u64 p)
{{
  .reg .b64 %rd<3>; .reg .b32 %r<3>;
  ld.param.u64 %rd1, [p];
  cvta.to.global.u64 %rd2, %rd1;
  ld.global.u32 %r1, [%rd2];
  add.s32 %r2, %r1, 1;
  st.global.u32 [%rd2], %r2;
  ret;
}}
.visible .entry framed(.param .u64 p) .maxntid 1024, 1, 1 .minnctapersm {min_ctas}
{{
  .local .align 4 .b8 buf[{frame_bytes}];
  .reg .b64 %rd<6>; .reg .b32 %r<4>;
  ld.param.u64 %rd1, [p];
  cvta.to.global.u64 %rd2, %rd1;
  ld.global.u32 %r1, [%rd2];
  and.b32 %r3, %r1, {frame_bytes // 4 - 1};
  mul.wide.u32 %rd3, %r3, 4;
  mov.u64 %rd4, buf;
  add.u64 %rd5, %rd4, %rd3;
  st.local.u32 [%rd5], %r1;
  ld.local.u32 %r2, [buf];
  st.global.u32 [%rd2], %r2;
  ret;
}}
"""


@pytest.mark.skipif(shutil.which("ptxas") is None, reason="needs ptxas (CUDA toolkit) on the PATH")
@pytest.mark.parametrize("seed", [0, 1])
def test_ptxas_report_reads_a_real_ptxas_run(tmp_path, seed):
    rng = np.random.default_rng(seed)
    frame = 4 * int(2 ** rng.integers(3, 7))  # 32..256 bytes, a power of two (the index mask)
    src = tmp_path / "k.ptx"
    src.write_text(_ptx(frame, int(rng.integers(3, 8))))  # > 2048 threads per SM: ignored
    out = subprocess.run(["ptxas", "-v", "-arch=sm_90a", str(src), "-o", str(tmp_path / "k.cubin")],
                         capture_output=True, text=True, check=True)
    report = ptxas.report(out.stdout + out.stderr)
    got = {f["function"]: f for f in report["functions"]}
    assert set(got) == {"plain", "framed"}
    assert got["framed"]["stack_frame_bytes"] == frame and got["plain"]["stack_frame_bytes"] == 0
    assert all(f["registers"] > 0 and f["spill_stores_bytes"] == 0 == f["spill_loads_bytes"] for f in got.values())
    note = report["notes"][0]["note"]
    assert len(report["notes"]) == 1 and "minnctapersm" in note and "framed" in note


def test_ptxas_report_counts_repeated_notes_once_each():
    """Mosaic's log as the child prints it (among its other output): each note kept once with its count, whatever
    PTX line it cites; "info" lines that are not performance notes left out; a log without an entry function gives
    no functions (the bench then says the kernel only compiles on the GPU)."""
    rng = np.random.default_rng(7)
    repeats = int(rng.integers(2, 9))
    lines = ["lowered in 20.1 s", "ptxas info    : Compiling entry function 'mosaic_kernel' for 'sm_90a'"]
    lines += [f"ptxas /tmp/tempfile-vm-1, line {int(line)}; info    : Potential out of bound access while accessing "
              "symbol '__dynamic_shmem__0'" for line in rng.integers(1, 9999, size=5)]
    lines += [f"ptxas /tmp/tempfile-vm-1, line {int(line)}; info    : (C7515) Potential Performance Loss: "
              "wgmma.mma_async instructions are serialized due to the presence of Extern calls in the function "
              "'mosaic_kernel'." for line in rng.integers(1, 9999, size=repeats)]
    lines += ["ptxas info    : Function properties for mosaic_kernel",
              "    48 bytes stack frame, 16 bytes spill stores, 24 bytes spill loads",
              "ptxas info    : Used 168 registers, used 1 barriers, 220832 bytes smem", '{"kernel_us": 2100.0}']
    report = ptxas.report("\n".join(lines))
    assert report["functions"] == [{"function": "mosaic_kernel", "registers": 168, "stack_frame_bytes": 48,
                                    "spill_stores_bytes": 16, "spill_loads_bytes": 24}]
    assert len(report["notes"]) == 1 and report["notes"][0]["count"] == repeats
    assert report["notes"][0]["note"].startswith("info") and "serialized" in report["notes"][0]["note"]
    assert ptxas.report("\n".join(lines[:1] + lines[-1:])) == {"functions": [], "notes": []}


def test_captured_collects_fd_output_and_restores_the_environment(capfd):
    """What a C++ library writes to fds 1 and 2 (here a child process sharing them) is collected; the variable that
    turns Mosaic's log on is set inside the block only."""
    before = os.environ.get(ptxas.ENV)
    word = f"ptxas info    : Used {int(np.random.default_rng(3).integers(32, 255))} registers"
    with ptxas.captured() as log:
        assert os.environ[ptxas.ENV] == "1"
        subprocess.run(["sh", "-c", f'echo "{word}"; echo "to stderr" >&2'], check=True)
    assert word in log.text and "to stderr" in log.text
    assert os.environ.get(ptxas.ENV) == before
    assert word in capfd.readouterr().out  # passed on to the real stdout afterwards
