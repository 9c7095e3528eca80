"""Compiles ``cdm_kernels._C`` just in time, where no build made ahead of time is installed.

``pip install .`` (an isolated build) installs the package without a compiled
extension. The first call that needs the ``cpp`` or ``cuda`` backend then
compiles _C with ``torch.utils.cpp_extension.load`` (ninja), from the sources
shipped in the package (``cdm_kernels/csrc/``; ``csrc/`` in a source checkout)
and with the flags of ``_extension_spec.py`` (the ones setup.py uses), against
the running torch. The library goes into a cache entry named by a hash of what
it depends on (torch's version and CUDA version, Python's ABI, the compile
flags, the CUDA architectures, every source file), so a change of any of them
builds a new entry; a checksum written after the build is verified before every
load, so an interrupted build or a corrupt library is rebuilt, never loaded.
Processes that start together (torchrun ranks, pytest-xdist workers) build
once: one holds a file lock while it compiles, the others wait and load.

``python -m cdm_kernels.build`` compiles it now: for images, and for clusters
whose compute nodes have no compiler (they load the entry a node with one
built into a shared cache).

Environment:
  CDM_KERNELS_JIT=0   never compile (an entry already cached is still loaded)
  CDM_KERNELS_CACHE   the cache folder (default: $XDG_CACHE_HOME/cdm_kernels, else
                      ~/.cache/cdm_kernels)
  CDM_KERNELS_CUDA    auto, 0 or 1, as for setup.py; CXX, MAX_JOBS and
                      TORCH_CUDA_ARCH_LIST as for torch's cpp_extension

Where torch has CUDA but no CUDA toolkit is found, an entry with the CUDA
kernels is still loaded if cached (built where there is one); only a new build
leaves them out, as setup.py does.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from . import _extension_spec as spec

PACKAGE = os.path.dirname(os.path.abspath(__file__))
MODULE = f"cdm_kernels.{spec.NAME}"
_STAMP = "stamp.json"
# a change of this module's layout of the cache (stamp, entry names) gets new entries
_FORMAT = 1


class Unavailable(Exception):
    """The extension cannot be loaded or built here; the message says why."""


def jit_enabled() -> bool:
    return os.environ.get("CDM_KERNELS_JIT", "1") != "0"


def cache_root() -> str:
    root = os.environ.get("CDM_KERNELS_CACHE")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "cdm_kernels")
    return os.path.abspath(root)


def source_folder() -> str:
    """The C++/CUDA sources: inside the installed package, else the checkout's csrc/."""
    for folder in (os.path.join(PACKAGE, "csrc"), os.path.join(os.path.dirname(PACKAGE), "csrc")):
        if os.path.isfile(os.path.join(folder, "ops.cpp")):
            return folder
    raise Unavailable(f"the C++ sources are not installed (no csrc/ops.cpp in {PACKAGE} or beside it)")


def _sources_digest(folder: str) -> str:
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, folder).encode() + b"\0")
            with open(path, "rb") as handle:
                digest.update(hashlib.sha256(handle.read()).digest())
    return digest.hexdigest()


def _cuda_architectures() -> str:
    """What the CUDA code is compiled for: TORCH_CUDA_ARCH_LIST, else the visible GPUs
    (torch's rule), else "" (torch's default list)."""
    chosen = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    if chosen and chosen != "native":
        return chosen
    import torch

    found = {"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    return ";".join(sorted(found))


@dataclass
class Plan:
    """One build of _C: what it is compiled from and with, and the cache entry it goes to."""

    csrc: str
    with_cuda: bool
    cxx_flags: List[str]
    nvcc_flags: List[str]
    link_flags: List[str]
    cuda_architectures: str = ""
    key: Dict[str, object] = field(default_factory=dict)

    @classmethod
    def create(cls, csrc: str, with_cuda: bool, sources_digest: str) -> "Plan":
        import torch

        defines = [f"-D{name}={value}" for name, value in spec.CUDA_DEFINES] if with_cuda else []
        plan = cls(
            csrc=csrc,
            with_cuda=with_cuda,
            cxx_flags=[*spec.CXX_FLAGS, *defines],
            nvcc_flags=[*spec.NVCC_FLAGS, *defines] if with_cuda else [],
            link_flags=list(spec.LINK_FLAGS),
            cuda_architectures=_cuda_architectures() if with_cuda else "",
        )
        plan.key = {
            "format": _FORMAT,
            "torch": torch.__version__,
            "torch_git": torch.version.git_version,
            "cuda": torch.version.cuda,
            "python": sys.implementation.cache_tag,
            "ext_suffix": sysconfig.get_config_var("EXT_SUFFIX"),
            "platform": sysconfig.get_platform(),
            "cxx_flags": plan.cxx_flags,
            "nvcc_flags": plan.nvcc_flags,
            "link_flags": plan.link_flags,
            "cuda_architectures": plan.cuda_architectures,
            "sources": sources_digest,
        }
        return plan

    @property
    def entry_name(self) -> str:
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]
        return f"torch{self.key['torch']}-{self.key['python']}-{'cuda' if self.with_cuda else 'cpu'}-{digest}"

    def sources(self, entry: str) -> List[str]:
        """The files to compile. torch's JIT build names each object after its file's name
        alone, so a name found twice (cpu/dense.cpp, cuda/dense.cpp) is compiled through a
        one-line file in ``entry`` that includes it, named after its path."""
        files = spec.sources(self.csrc, self.with_cuda)
        stems = [(os.path.splitext(os.path.basename(f))[0], f.endswith(".cu")) for f in files]
        unique = []
        for path, stem in zip(files, stems):
            if stems.count(stem) > 1:
                wrapper = os.path.join(entry, os.path.relpath(path, self.csrc).replace(os.sep, "_"))
                with open(wrapper, "w") as handle:
                    handle.write(f'#include "{os.path.abspath(path)}"\n')
                path = wrapper
            unique.append(path)
        return unique


def plans() -> List[Plan]:
    """The builds to look for in the cache, the one to build last: with the CUDA kernels
    where torch has CUDA (cached ones load without a toolkit), then as setup.py decides."""
    import torch

    try:
        with_cuda = spec.build_cuda()
    except spec.CudaChoiceError as error:
        raise Unavailable(str(error)) from None
    csrc = source_folder()
    digest = _sources_digest(csrc)
    choices = [with_cuda]
    if not with_cuda and torch.version.cuda is not None and os.environ.get("CDM_KERNELS_CUDA", "auto") != "0":
        choices.insert(0, True)
    return [Plan.create(csrc, choice, digest) for choice in choices]


# ----------------------------------------------------------------------------- the cache


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def verified_library(entry: str) -> Optional[str]:
    """The entry's library if its stamp is there and its checksum matches, else None."""
    try:
        with open(os.path.join(entry, _STAMP)) as handle:
            stamp = json.load(handle)
        library = os.path.join(entry, stamp["library"])
        if os.path.basename(library) != stamp["library"] or _file_sha256(library) != stamp["sha256"]:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return library


def _write_stamp(entry: str, library: str, plan: Plan, seconds: float) -> None:
    stamp = {
        "library": os.path.basename(library),
        "sha256": _file_sha256(library),
        "build_seconds": round(seconds, 1),
        "key": plan.key,
    }
    temporary = os.path.join(entry, f".{_STAMP}.{os.getpid()}")
    with open(temporary, "w") as handle:
        json.dump(stamp, handle, indent=1)
    os.replace(temporary, os.path.join(entry, _STAMP))


def _discard(entry: str) -> None:
    """Remove an entry without a valid stamp. Renamed first: a process that mapped its
    library keeps it, and the new build never writes over a file in use."""
    if not os.path.lexists(entry):
        return
    aside = f"{entry}.stale-{os.getpid()}-{time.time_ns()}"
    try:
        os.rename(entry, aside)
    except OSError:
        aside = entry
    shutil.rmtree(aside, ignore_errors=True)


def import_library(library: str):
    """Import the library as cdm_kernels._C (its TORCH_LIBRARY blocks register the ops)."""
    import importlib.machinery
    import importlib.util

    loader = importlib.machinery.ExtensionFileLoader(MODULE, library)
    module_spec = importlib.util.spec_from_file_location(MODULE, library, loader=loader)
    module = importlib.util.module_from_spec(module_spec)
    loader.exec_module(module)
    sys.modules[MODULE] = module
    setattr(sys.modules["cdm_kernels"], spec.NAME, module)
    return module


# ----------------------------------------------------------------------------- the build


def _compiler_problem() -> Optional[str]:
    compiler = os.environ.get("CXX", "c++")
    program = (shlex.split(compiler) or [""])[0]
    if not shutil.which(program):
        where = "CXX" if "CXX" in os.environ else "PATH"
        return f"no C++ compiler: {program!r} was not found (from {where}; set CXX to a C++ compiler)"
    return None


@contextlib.contextmanager
def _build_environment(plan: Plan):
    """PATH with ninja (the pip package's, where no other is on PATH) and the CUDA
    architectures of the plan, for the build only."""
    changes = {}
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            raise Unavailable("ninja is not installed (pip install ninja)") from None
        changes["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    if plan.cuda_architectures:
        changes["TORCH_CUDA_ARCH_LIST"] = plan.cuda_architectures
    saved = {name: os.environ.get(name) for name in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _first_error_line(message: str) -> str:
    """The line of a failed build's output that says most: a compiler error, else the
    step that failed, else the first."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    compiler_errors = [line for line in lines if re.search(r"\berror:", line, re.IGNORECASE)]
    for found in (compiler_errors, [line for line in lines if line.startswith("FAILED:")], lines):
        if found:
            return found[0][:300]
    return "no output"


def _compile(plan: Plan, entry: str, verbose: bool) -> str:
    """Build the plan into ``entry`` (absent or discarded before), stamp it; the library."""
    from torch.utils import cpp_extension

    kernels = "CPU and CUDA kernels" if plan.with_cuda else "CPU kernels"
    print(f"cdm_kernels: compiling the C++ extension ({kernels}) into {entry} ...", end="", file=sys.stderr, flush=True)
    start = time.perf_counter()
    os.makedirs(entry)
    try:
        with _build_environment(plan):
            library = cpp_extension.load(
                name=spec.NAME,
                sources=plan.sources(entry),
                extra_cflags=plan.cxx_flags,
                extra_cuda_cflags=plan.nvcc_flags,
                extra_ldflags=plan.link_flags,
                extra_include_paths=[plan.csrc],
                build_directory=entry,
                with_cuda=plan.with_cuda,
                is_python_module=False,
                verbose=verbose,
            )
    except BaseException:
        print(" failed", file=sys.stderr, flush=True)
        raise
    seconds = time.perf_counter() - start
    _write_stamp(entry, library, plan, seconds)
    print(f" done in {seconds:.1f} s", file=sys.stderr, flush=True)
    return library


def _build_locked(plan: Plan, entry: str, verbose: bool) -> str:
    """Build ``entry`` unless another process did while this one waited for the lock."""
    from filelock import FileLock, Timeout

    started = time.time()
    try:
        os.makedirs(os.path.dirname(entry), exist_ok=True)
        lock = FileLock(f"{entry}.lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            print(f"cdm_kernels: waiting for another process compiling the C++ extension ({entry}.lock)", file=sys.stderr, flush=True)
            lock.acquire()
    except OSError as error:
        raise Unavailable(
            f"the cache folder {os.path.dirname(entry)} is not writable ({error}); "
            "set CDM_KERNELS_CACHE to a writable folder"
        ) from None
    failed = f"{entry}.failed"
    try:
        library = verified_library(entry)
        if library is not None:
            return library
        if os.path.exists(failed) and os.path.getmtime(failed) >= started:
            with open(failed) as handle:  # the build this process waited for failed: not again
                raise Unavailable(handle.readline().strip())
        _discard(entry)
        try:
            library = _compile(plan, entry, verbose)
        except Unavailable:
            raise
        except Exception as error:
            message = f"{type(error).__name__}: {error}"
            reason = f"compiling it failed ({_first_error_line(message)}; the log: {failed})"
            with open(failed, "w") as handle:
                handle.write(reason + "\n\n" + message)
            raise Unavailable(reason) from None
        with contextlib.suppress(OSError):
            os.remove(failed)
        return library
    finally:
        lock.release()


def load(build: Optional[bool] = None, verbose: bool = False) -> str:
    """Load _C from the cache, compiling it first where none is cached and ``build``
    (default: unless CDM_KERNELS_JIT=0). Returns the library's path; raises
    :class:`Unavailable` with the reason where it cannot."""
    build = jit_enabled() if build is None else build
    candidates = plans()
    root = cache_root()
    unloadable = []
    for plan in candidates:
        library = verified_library(os.path.join(root, plan.entry_name))
        if library is not None:
            try:
                import_library(library)
                return library
            except ImportError as error:  # intact, but e.g. a runtime library is missing here
                unloadable.append(f"the cached {library} does not load ({error})")
    plan = candidates[-1]
    if unloadable and verified_library(os.path.join(root, plan.entry_name)) is not None:
        raise Unavailable("; ".join(unloadable))
    if not build:
        raise Unavailable(
            "it was not built ahead of time, none is cached in "
            f"{root}, and the just-in-time build is off (CDM_KERNELS_JIT=0); "
            "build it with `python -m cdm_kernels.build`"
        )
    problem = _compiler_problem()
    if problem:
        raise Unavailable(problem)
    entry = os.path.join(root, plan.entry_name)
    library = _build_locked(plan, entry, verbose)
    try:
        import_library(library)
    except ImportError as error:
        raise Unavailable(f"the library just built does not load ({error})") from None
    return library


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cdm_kernels.build",
        description="Compile cdm_kernels._C into the cache now (where no build made ahead of time is "
        "installed), so that later processes load it without compiling. The cache folder is "
        "CDM_KERNELS_CACHE (default ~/.cache/cdm_kernels).",
    )
    parser.add_argument("--verbose", action="store_true", help="show the compiler's commands and output")
    args = parser.parse_args(argv)

    from . import backends

    if backends.extension_loaded():
        print(f"cdm_kernels: the extension built ahead of time is installed ({sys.modules[MODULE].__file__}); nothing to build")
        return 0
    try:
        library = load(build=True, verbose=args.verbose)
    except Unavailable as error:
        print(f"cdm_kernels: the C++ extension is not available: {error}", file=sys.stderr)
        return 1
    print(f"cdm_kernels: the C++ extension is cached at {library}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
