"""Run-directory outputs: TensorBoard scalars and a metrics JSONL file.

TensorBoard events are written with the `tensorboard` package's own event writer and protos (no TensorFlow or
torch needed). The JSONL file gets one object per log step; on resume, lines past the restored step (written
by the interrupted run after its last checkpoint) are dropped so the file reads as one continuous run.
"""
from __future__ import annotations

import json
import math
import pathlib
from typing import Mapping

import numpy as np


def flatten_metrics(metrics: Mapping, prefix: str) -> dict[str, float]:
    """{"loss": x, "mtp_loss": [a, b]} -> {"<prefix>/loss": x, "<prefix>/mtp_loss_k1": a, "<prefix>/mtp_loss_k2": b}.

    Vector entries are per MTP depth k = 1..D.
    """
    out = {}
    for key, value in metrics.items():
        arr = np.asarray(value, np.float64)
        if arr.ndim == 0:
            out[f"{prefix}/{key}"] = float(arr)
        else:
            for k, v in enumerate(arr.reshape(-1), start=1):
                out[f"{prefix}/{key}_k{k}"] = float(v)
    return out


class TensorBoardWriter:
    """Scalars to `<logdir>/events.out.tfevents.*`, readable by `tensorboard --logdir`."""

    def __init__(self, logdir: str | pathlib.Path):
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._event, self._summary = Event, Summary
        pathlib.Path(logdir).mkdir(parents=True, exist_ok=True)
        self._writer = EventFileWriter(str(logdir))

    def scalars(self, values: Mapping[str, float], step: int, wall_time: float | None = None) -> None:
        import time

        summary = self._summary(value=[self._summary.Value(tag=tag, simple_value=float(v))
                                       for tag, v in values.items() if math.isfinite(float(v))])
        self._writer.add_event(self._event(wall_time=wall_time or time.time(), step=int(step), summary=summary))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class JsonlWriter:
    """Appends one JSON object per line; `truncate_after(step)` drops records with a larger "step"."""

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and _step_of(line) is not None and _step_of(line) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: Mapping) -> None:
        """Appends `record`; non-finite floats become null (strict JSON)."""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean, sort_keys=True) + "\n")


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def read_jsonl(path: str | pathlib.Path) -> list[dict]:
    """All records of a metrics JSONL file (skipping a torn last line)."""
    out = []
    for line in pathlib.Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
