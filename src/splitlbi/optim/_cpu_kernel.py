"""Build and load the fused CPU step (``csrc/fused_step.cpp``) on first use.

The kernel is compiled with the system C++ compiler against the installed torch into a
cache folder (``$SPLITLBI_CACHE`` or ``~/.cache/splitlbi``) named by a hash of the
source, the torch version, the compiler flags and the CPU, so a build happens once per
machine and torch, not once per process. When no compiler is found or the build fails,
:func:`load` returns False and the optimizer silently keeps its ``_foreach`` path
(set ``SPLITLBI_NO_CPP=1`` to force that path). Build errors are kept in the cache
folder's ``build.log``. A build says so on stderr, one line before (where it goes) and one
after (how long it took): the first ``opt.step()`` on a machine otherwise seems to hang.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import torch

SOURCE = Path(__file__).with_name("csrc") / "fused_step.cpp"
# -march=native: the build is per machine (the CPU is part of the cache key).
FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp", "-march=native", "-w")

_lock = threading.Lock()
_loaded: Optional[bool] = None


def cache_dir() -> Path:
    root = os.environ.get("SPLITLBI_CACHE") or Path.home() / ".cache" / "splitlbi"
    return Path(root)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def library_path(compiler: str) -> Path:
    """Where the shared library of this source, torch and CPU lives."""
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), torch.__version__.encode(), " ".join(FLAGS).encode(),
                 compiler.encode(), _cpu_name().encode(), sys.version.encode()):
        key.update(part)
        key.update(b"\0")
    return cache_dir() / f"fused_step_{key.hexdigest()[:16]}" / "fused_step.so"


def _build(compiler: str, target: Path) -> None:
    from torch.utils import cpp_extension

    target.parent.mkdir(parents=True, exist_ok=True)
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    command = [compiler, *FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    command += [f"-I{path}" for path in cpp_extension.include_paths()]
    # Build into a temporary file and rename: concurrent processes never load half a file.
    fd, partial = tempfile.mkstemp(dir=target.parent, suffix=".so.partial")
    os.close(fd)
    command += [str(SOURCE), "-o", partial]
    command += [f"-L{path}" for path in cpp_extension.library_paths()]
    command += [f"-Wl,-rpath,{path}" for path in cpp_extension.library_paths()]
    command += ["-lc10", "-ltorch_cpu"]
    try:
        result = subprocess.run(command, capture_output=True, text=True)
        (target.parent / "build.log").write_text(" ".join(command) + "\n" + result.stdout + result.stderr)
        if result.returncode != 0:
            raise RuntimeError(f"building {SOURCE.name} failed, see {target.parent / 'build.log'}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def build_with_notice(compiler: str, target: Path) -> None:
    """:func:`_build`, announced on stderr (a build takes 30-70 s, once per machine and torch)."""
    print(f"splitlbi: compiling the fused CPU step once for this machine and torch (about a minute); cached in "
          f"{target.parent}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        _build(compiler, target)
    except Exception:
        print(f"splitlbi: the fused CPU step did not build (see {target.parent / 'build.log'}); using the "
              f"multi-tensor step", file=sys.stderr, flush=True)
        raise
    print(f"splitlbi: compiled the fused CPU step in {time.perf_counter() - started:.0f} s", file=sys.stderr,
          flush=True)


def load() -> bool:
    """Compile (once per machine) and load the kernel; True when
    ``torch.ops.splitlbi.fused_step_`` is available. Never raises."""
    global _loaded
    if _loaded is not None:
        return _loaded
    with _lock:
        if _loaded is None:
            _loaded = _try_load()
    return _loaded


def _try_load() -> bool:
    if os.environ.get("SPLITLBI_NO_CPP", "") not in ("", "0"):
        return False
    try:
        torch.ops.splitlbi.fused_step_  # already registered in this process
        return True
    except (AttributeError, RuntimeError):
        pass
    compiler = _compiler()
    if compiler is None or not SOURCE.exists():
        return False
    try:
        target = library_path(compiler)
        if not target.exists():
            build_with_notice(compiler, target)
        torch.ops.load_library(str(target))
        torch.ops.splitlbi.fused_step_
        return True
    except Exception:  # no headers, a broken toolchain, a read-only home: keep the _foreach path
        return False
