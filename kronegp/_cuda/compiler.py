"""Compile kernel specs to cubins with NVRTC (``cuda.bindings.nvrtc``), cached on disk.

The cache key is a hash of: every source file in ``cuda_ext/``, the generated specialisation
text (dtype, factor shapes, tile), the target architecture and the NVRTC version; the cache
lives in ``$KRONEGP_CACHE_DIR`` or ``~/.cache/kronegp``. A cubin for ``sm_90`` compiles on a
machine with no GPU at all (CI does this for every spec the GPU tests use).
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Sequence

__all__ = ["source_dir", "cache_dir", "compile_specs", "nvrtc_version", "CompileError"]

_HEADERS = ("kron_common.cuh", "kron_mma.cuh", "kron_fused.cuh", "kron_gemm.cuh", "kron_transpose.cuh", "cg_update.cuh", "jacobi_eigh.cuh")
_announced = False


class CompileError(RuntimeError):
    """NVRTC rejected a generated kernel; the message holds its log."""


def source_dir() -> Path:
    """Where the CUDA sources are: ``$KRONEGP_CUDA_SRC``, the wheel's ``kronegp/_cuda_src``,
    or the repository's top-level ``cuda_ext/`` (editable installs)."""
    env = os.environ.get("KRONEGP_CUDA_SRC")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve().parent
    candidates += [here.parent / "_cuda_src", here.parents[1] / "cuda_ext"]
    for c in candidates:
        if (c / _HEADERS[0]).is_file():
            return c
    raise FileNotFoundError(
        "kronegp's CUDA sources (cuda_ext/kron_common.cuh) were not found in "
        + ", ".join(map(str, candidates))
        + "; set KRONEGP_CUDA_SRC to the folder that holds them"
    )


def cache_dir() -> Path:
    return Path(os.environ.get("KRONEGP_CACHE_DIR") or Path.home() / ".cache" / "kronegp")


@lru_cache(maxsize=None)
def _sources_hash() -> str:
    h = hashlib.sha256()
    src = source_dir()
    for name in _HEADERS:
        h.update(name.encode())
        h.update((src / name).read_bytes())
    return h.hexdigest()


@lru_cache(maxsize=None)
def nvrtc_version() -> tuple[int, int]:
    from cuda.bindings import nvrtc

    err, major, minor = nvrtc.nvrtcVersion()
    _check(err, "nvrtcVersion")
    return int(major), int(minor)


def _check(err, what: str, log: str = "") -> None:
    from cuda.bindings import nvrtc

    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise CompileError(f"{what} failed: {err}" + (f"\n{log}" if log else ""))


def program_source(specs_named: Sequence[tuple[str, object]]) -> str:
    body = "".join(spec.source(name) for name, spec in specs_named)
    return "".join(f'#include "{h}"\n' for h in _HEADERS[1:]) + body


def _nvrtc_compile(source: str, arch: str, name: str, verbose: bool = False):
    from cuda.bindings import nvrtc

    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), f"{name}.cu".encode(), 0, [], [])
    _check(err, "nvrtcCreateProgram")
    try:
        opts = [
            f"--gpu-architecture={arch}".encode(),
            b"-std=c++17",
            b"-default-device",  # unannotated constexpr helpers are device code too
            f"--include-path={source_dir()}".encode(),
            b"--fmad=true",  # contraction into FMA: exact fused multiply-add, no fast math
        ]
        if verbose:
            opts.append(b"--ptxas-options=-v")
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            _, size = nvrtc.nvrtcGetProgramLogSize(prog)
            log = b" " * size
            nvrtc.nvrtcGetProgramLog(prog, log)
            raise CompileError(f"NVRTC failed to compile {name} for {arch}:\n{log.decode(errors='replace')}")
        err, size = nvrtc.nvrtcGetCUBINSize(prog)
        _check(err, "nvrtcGetCUBINSize")
        cubin = b" " * size
        (err,) = nvrtc.nvrtcGetCUBIN(prog, cubin)
        _check(err, "nvrtcGetCUBIN")
        if verbose:
            _, size = nvrtc.nvrtcGetProgramLogSize(prog)
            log = b" " * size
            nvrtc.nvrtcGetProgramLog(prog, log)
            return cubin, log.decode(errors="replace")
        return cubin
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def compile_specs(specs_named: Sequence[tuple[str, object]], arch: str) -> bytes:
    """A cubin for ``arch`` (e.g. ``"sm_90"``) holding one kernel per ``(name, spec)``.

    Served from the disk cache when the same sources, specs, arch and NVRTC were compiled
    before; otherwise compiled (a one-line message the first time in a process) and stored.
    """
    global _announced
    source = program_source(specs_named)
    major, minor = nvrtc_version()
    key = hashlib.sha256(
        f"{_sources_hash()}|{arch}|nvrtc{major}.{minor}|".encode() + source.encode()
    ).hexdigest()
    path = cache_dir() / f"{key[:40]}.cubin"
    if path.is_file():
        return path.read_bytes()
    if not _announced:
        _announced = True
        print(
            f"kronegp: compiling CUDA kernels for {arch} with NVRTC {major}.{minor} "
            f"(cached in {cache_dir()})",
            file=sys.stderr,
        )
    cubin = _nvrtc_compile(source, arch, specs_named[0][0])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # write then rename: concurrent processes never read a half-written cubin
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(cubin)
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache only costs a recompilation next time
    return cubin


def resource_report(spec, arch: str = "sm_90") -> str:
    """ptxas's register / shared memory / spill report for one spec (a development aid)."""
    name = kernel_name(spec)
    _, log = _nvrtc_compile(program_source([(name, spec)]), arch, name, verbose=True)
    return log


def kernel_name(spec) -> str:
    """A stable C identifier for a spec (its hash: the spec text itself is the key)."""
    digest = hashlib.sha1(repr(spec).encode()).hexdigest()[:16]
    return f"kronegp_{spec.kind}_{digest}"
