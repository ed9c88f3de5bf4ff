"""The compiler's view of a Mosaic GPU kernel: ptxas' registers, stack frame, spills and performance notes.

The persistent kernel is one function, so every body shares one register allocation: at glm5_slice it sits at
ptxas' 255-register cap with ~1.3 KB of spills, and code added to one body moves spills (and time) into the
others; a one-thread branch between wgmmas made ptxas serialize every wgmma of the kernel (experiments/results/
session23/). Mosaic prints `ptxas -v`'s log when MOSAIC_GPU_DUMP_PTXAS is set (to the process' stdout, from C++;
MOSAIC_GPU_DUMP_TO would also turn on every other dump, ~670 MB of MLIR pass logs for this kernel).

    with ptxas.captured() as log:      # fd-level: the log comes from C++, not from Python's sys.stdout
        lowered.compile()
    ptxas.report(log.text)             # {"functions": [...], "notes": [...]}

GPU only: a CPU jaxlib lowers the kernel but cannot compile it (Mosaic's compiler is in the CUDA PJRT plugin).
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

ENV = "MOSAIC_GPU_DUMP_PTXAS"
_FIELDS = ("registers", "stack_frame_bytes", "spill_stores_bytes", "spill_loads_bytes")


def report(text: str) -> dict:
    """`ptxas -v` output -> {"functions": per entry function its function, registers, stack_frame_bytes,
    spill_stores_bytes, spill_loads_bytes; "notes": ptxas' warnings and "Potential Performance Loss" lines (e.g.
    wgmma.mma_async serialized; they name their function) as {"note", "count"}, in order of first sight, the PTX
    file and line they cite dropped so that repeats count as one note}. Other lines (the program's own output,
    ptxas' plain info lines) are ignored."""
    functions, counts, cur = [], {}, None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            functions.append({"function": m.group(1), **dict.fromkeys(_FIELDS)})
            cur = functions[-1]
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and cur is not None:
            cur.update(zip(_FIELDS[1:], map(int, m.groups())))
        m = re.search(r"Used (\d+) registers", line)
        if m and cur is not None:
            cur["registers"] = int(m.group(1))
        if re.search(r"warning|performance loss", line, re.IGNORECASE):
            note = re.sub(r"^ptxas\s+(\S+, line \d+;\s*)?", "", line.strip())
            counts[note] = counts.get(note, 0) + 1
    return {"functions": functions, "notes": [{"note": n, "count": c} for n, c in counts.items()]}


class _Log:
    text = ""


@contextlib.contextmanager
def captured():
    """Sets MOSAIC_GPU_DUMP_PTXAS for the block and collects everything written to file descriptors 1 and 2
    meanwhile (Mosaic's C++ log included) into the yielded object's `.text`; the output still reaches the
    original stdout / stderr afterwards."""
    log, old_env = _Log(), os.environ.get(ENV)
    os.environ[ENV] = "1"
    sys.stdout.flush(), sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 1), os.dup2(tmp.fileno(), 2)
        try:
            yield log
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            if old_env is None:
                os.environ.pop(ENV, None)
            else:
                os.environ[ENV] = old_env
            tmp.seek(0)
            log.text = tmp.read().decode(errors="replace")
            sys.stdout.write(log.text)
            sys.stdout.flush()
