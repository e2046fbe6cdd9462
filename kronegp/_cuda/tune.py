"""Opt-in autotuning of the path choice: time the candidate paths of a call signature once.

The cost model (:func:`kronegp._cuda.plan.choose_path`) picks a path from predicted bytes,
FLOPs and host costs; where it is wrong (NOTES.md lists such shapes) the pick can be 1.4×
slower than the best path. With autotuning on (``kronegp.set_autotune(True)`` or
``KRONEGP_AUTOTUNE=1``), the first call of each signature — side, factor shapes, rows,
batch size, dtype size, layout, whether the cuBLAS path is allowed, float32 precision mode — runs every candidate path a few
times on the call's own operands, keeps the fastest and stores the timings in a JSON file in
the kernel cache folder, one per GPU model. Later calls, and later processes on the same GPU
model with the same kernel sources, cuBLAS-path code and torch version, look the choice up.

Timing synchronises the device (CUDA events), once per signature; it is skipped during CUDA
graph capture, where the cost model decides.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

__all__ = ["PathTuner", "time_candidates", "tune_key"]

_FORMAT = 3  # 2: keys carry the float32 precision mode; 3: and the batch size


def tune_key(side: str, shapes: tuple, m: int, itemsize: int, in_col: bool, out_col: bool, axis_ok: bool,
             precision: str = "highest", batch: int = 1) -> tuple:
    """The signature a tuned choice is valid for (hashable; :func:`_key_text` spells it). ``m``
    counts the rows of all ``batch`` products: a batched ``kron_matmul`` of ``B`` products with
    ``T`` columns and an unbatched one with ``B·T`` columns share ``m`` but not their best path."""
    return (side, tuple((int(p), int(q)) for p, q in shapes), int(m), int(itemsize), bool(in_col), bool(out_col),
            bool(axis_ok), str(precision), int(batch))


def _key_text(key: tuple) -> str:
    side, shapes, m, itemsize, in_col, out_col, axis_ok, precision, batch = key
    sh = ",".join(f"{p}x{q}" for p, q in shapes)
    return (f"{side}|{sh}|m={m}|b={itemsize}|in_col={int(in_col)}|out_col={int(out_col)}|axis={int(axis_ok)}"
            f"|prec={precision}|nb={batch}")


def time_candidates(
    run: Callable[[str], object],
    candidates: Sequence[str],
    reps: Optional[int] = None,
    timer: Optional[Callable[[Callable[[], object]], float]] = None,
    budget_ms: float = 5.0,
    max_reps: int = 25,
) -> dict[str, float]:
    """Median milliseconds of ``run(path)`` for each candidate path that runs (a candidate that
    runs out of device memory is left out; none left: an empty dict).

    Each candidate runs once untimed first (kernel compilation, cuBLAS heuristics), then the
    candidates take turns, so a slow spell of the device hits them alike. ``reps`` turns, or
    by default as many as fit ``budget_ms`` per candidate (at least 3, at most ``max_reps``):
    calls of tens of µs, whose timings the host's jitter dominates, get more samples.
    ``timer(fn)`` returns one timing of ``fn`` in ms (default: CUDA events on the current stream).
    """
    if timer is None:
        timer = _cuda_event_ms
    ok = []
    for c in candidates:
        try:
            run(c)
            ok.append(c)
        except torch.cuda.OutOfMemoryError:
            # a path whose intermediates do not fit is not a candidate (the memory it took
            # goes back to torch's cache when the exception is dropped)
            continue
    if not ok:
        return {}
    samples: dict[str, list[float]] = {c: [timer(lambda c=c: run(c))] for c in ok}
    if reps is None:
        fastest = max(min(v[0] for v in samples.values()), 1e-3)
        reps = int(min(max_reps, max(3, budget_ms // fastest)))
    for _ in range(reps - 1):
        for c in ok:
            samples[c].append(timer(lambda c=c: run(c)))
    return {c: statistics.median(v) for c, v in samples.items()}


def _cuda_event_ms(fn: Callable[[], object]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return float(start.elapsed_time(end))


class PathTuner:
    """The tuned choices of one GPU model: in memory, and in ``file`` when given.

    The file records the kernel sources' and the cuBLAS paths' hashes and torch's version; a file
    written under other ones is ignored (its timings describe other code) and replaced on the next
    save.
    """

    def __init__(self, file: Optional[Path], stamp: dict):
        self.file, self.stamp = file, dict(stamp)
        self.table: dict[tuple, str] = {}
        self.timings: dict[tuple, dict[str, float]] = {}
        self._loaded_text: dict[str, dict] = {}
        if file is not None:
            self._loaded_text = self._read()

    @staticmethod
    def file_for(cache: Path, device_name: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", device_name).strip("_") or "gpu"
        return cache / f"autotune-{safe}.json"

    def _read(self, quiet: bool = False) -> dict[str, dict]:
        try:
            data = json.loads(self.file.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            if not quiet:
                warnings.warn(f"kronegp: ignoring unreadable autotune file {self.file} ({err})", RuntimeWarning, stacklevel=2)
            return {}
        if not isinstance(data, dict) or data.get("format") != _FORMAT or data.get("stamp") != self.stamp:
            return {}
        entries = data.get("entries")
        return entries if isinstance(entries, dict) else {}

    def lookup(self, key: tuple) -> Optional[str]:
        hit = self.table.get(key)
        if hit is None and self._loaded_text:
            entry = self._loaded_text.get(_key_text(key))
            if isinstance(entry, dict) and isinstance(entry.get("path"), str):
                hit = self.table[key] = entry["path"]
        return hit

    def record(self, key: tuple, times_ms: dict[str, float], model_path: str) -> str:
        """Store the fastest candidate of ``times_ms`` for ``key`` (and save); return it."""
        best = min(times_ms, key=times_ms.get)
        self.table[key], self.timings[key] = best, dict(times_ms)
        entry = {"path": best, "model_path": model_path, "times_ms": {k: round(v, 5) for k, v in times_ms.items()}}
        self._loaded_text[_key_text(key)] = entry
        if self.file is not None:
            self._save(_key_text(key), entry)
        return best

    def _save(self, text: str, entry: dict) -> None:
        # Merge with what other processes wrote since we read; write then rename (atomic).
        entries = self._read(quiet=True)
        entries[text] = entry
        data = {"format": _FORMAT, "stamp": self.stamp, "entries": entries}
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.file.parent, suffix=".tmp")
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh, indent=1, sort_keys=True)
            os.replace(tmp, self.file)
        except OSError as err:
            warnings.warn(f"kronegp: could not save autotune results to {self.file} ({err})", RuntimeWarning, stacklevel=2)
