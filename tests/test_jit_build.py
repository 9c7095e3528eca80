"""The just-in-time build of cdm_kernels._C (cdm_kernels/build.py).

The fast tests check the cache's bookkeeping in this process. The slow ones install
the package as a user would, with pip's isolated build, into a fresh venv (with
``--no-deps``: a .pth file there points at the running torch's site-packages, so that
nothing is downloaded and no second torch is installed), and run processes in it that
compile, load, rebuild, or fall back.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch

from cdm_kernels import build

REPO = Path(__file__).resolve().parents[1]
COMPILING = "cdm_kernels: compiling the C++ extension"
BUILD_TIMEOUT = 1800  # seconds: a build on a busy two-core machine


# ----------------------------------------------------------------------------- the cache's bookkeeping


def make_entry(folder: Path, payload: bytes = b"\x7fELF library bytes") -> Path:
    folder.mkdir()
    library = folder / "_C.so"
    library.write_bytes(payload)
    plan = build.Plan.create(str(REPO / "csrc"), False, "digest")
    build._write_stamp(str(folder), str(library), plan, 1.0)
    return library


def test_an_intact_entry_is_verified(tmp_path):
    library = make_entry(tmp_path / "entry")
    assert build.verified_library(str(tmp_path / "entry")) == str(library)


@pytest.mark.parametrize("damage", ["flip_a_byte", "truncate", "no_stamp", "garbled_stamp", "stamp_escapes"])
def test_a_damaged_entry_is_not_verified(tmp_path, damage):
    entry = tmp_path / "entry"
    library = make_entry(entry)
    stamp = entry / "stamp.json"
    if damage == "flip_a_byte":
        data = bytearray(library.read_bytes())
        data[3] ^= 1
        library.write_bytes(bytes(data))
    elif damage == "truncate":
        library.write_bytes(library.read_bytes()[:-1])
    elif damage == "no_stamp":
        stamp.unlink()
    elif damage == "garbled_stamp":
        stamp.write_text("{not json")
    else:
        (tmp_path / "other.so").write_bytes(library.read_bytes())
        content = json.loads(stamp.read_text())
        stamp.write_text(json.dumps(dict(content, library="../other.so")))
    assert build.verified_library(str(entry)) is None


def test_the_entry_name_follows_sources_flags_and_torch(tmp_path, monkeypatch):
    csrc = tmp_path / "csrc"
    shutil.copytree(REPO / "csrc", csrc)
    before = build._sources_digest(str(csrc))
    (csrc / "cpu" / "scores_to_posterior.cpp").write_text((csrc / "cpu" / "scores_to_posterior.cpp").read_text() + "\n")
    assert build._sources_digest(str(csrc)) != before
    (csrc / "cpu" / "new.h").write_text("")
    names = {build.Plan.create(str(csrc), False, digest).entry_name for digest in ("a", "b")}
    assert len(names) == 2
    plain = build.Plan.create(str(csrc), False, "a").entry_name
    monkeypatch.setattr(build.spec, "CXX_FLAGS", [*build.spec.CXX_FLAGS, "-DEXTRA"])
    assert build.Plan.create(str(csrc), False, "a").entry_name != plain
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert build.Plan.create(str(csrc), False, "a").entry_name.startswith("torch0.0.0-")


def test_a_failed_build_is_summed_up_by_its_first_compiler_error():
    output = (
        "RuntimeError: Error building extension '_C': [1/9] c++ -c ops.cpp -o ops.o\n"
        "FAILED: isa.o\nc++ -c cpu/isa.cpp -o isa.o\n"
        "cpu/isa.cpp:12:3: error: 'frobnicate' was not declared in this scope\n"
        "ninja: build stopped: subcommand failed.\n"
    )
    assert build._first_error_line(output) == "cpu/isa.cpp:12:3: error: 'frobnicate' was not declared in this scope"
    assert build._first_error_line(output.replace("error:", "oops")) == "FAILED: isa.o"


def test_sources_are_found_in_the_checkout():
    assert Path(build.source_folder()) == REPO / "csrc"


def test_a_stale_entry_is_set_aside_and_removed(tmp_path):
    make_entry(tmp_path / "entry")
    build._discard(str(tmp_path / "entry"))
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- an isolated `pip install .`

FIRST_CALL = textwrap.dedent(
    """
    import json, sys, time, torch
    import cdm_kernels as ck
    graph = ck.UniformGraph(7)
    log_score, x = torch.randn(3, 7, dtype=torch.float64), torch.randint(0, 7, (3,))
    start = time.perf_counter()
    out = ck.scores_to_posterior(graph, log_score, x, 0.3)  # backend=None: the first question about cpp
    seconds = time.perf_counter() - start
    assert torch.allclose(out, ck.scores_to_posterior(graph, log_score, x, 0.3, backend="reference"))
    extension = sys.modules.get("cdm_kernels._C")
    print(json.dumps({
        "backends": ck.available_backends("cpu"),
        "why_cpp": ck.why_unavailable("cpp"),
        "seconds": seconds,
        "library": getattr(extension, "__file__", None),
    }))
    """
)


def copy_project(target: Path) -> Path:
    """What `pip install .` reads, without build outputs (a prebuilt _C, build/)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.o", "build", "*.egg-info")
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in"):
        shutil.copy2(REPO / name, target / name)
    for name in ("cdm_kernels", "cdm", "csrc"):
        shutil.copytree(REPO / name, target / name, ignore=ignore)
    return target


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """A fresh venv holding cdm-kernels from an isolated `pip install .`; the venv's python."""
    root = tmp_path_factory.mktemp("jit")
    (root / "project").mkdir()
    project = copy_project(root / "project")
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True, timeout=300)
    python = root / "venv" / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    # the running torch (and numpy, ninja, filelock beside it), after the venv's own packages
    Path(site, "running_torch.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # --no-deps --ignore-installed: the dependencies are those of the running torch's
    # site-packages, which pip must neither reinstall nor touch
    pip = subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "--ignore-installed", str(project)],
        env=clean_env(), cwd=root, capture_output=True, text=True, timeout=900,
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr
    return python


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CDM_KERNELS_", "PIP_")) and k not in ("PYTHONPATH", "CXX")}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def start(python, cache, code=FIRST_CALL, **extra):
    return subprocess.Popen(
        [str(python), "-c", code], env=clean_env(CDM_KERNELS_CACHE=str(cache), **extra),
        cwd=str(Path(python).parents[2]), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def finish(process):
    out, err = process.communicate(timeout=BUILD_TIMEOUT)
    assert process.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1]), err


def run(python, cache, code=FIRST_CALL, **extra):
    return finish(start(python, cache, code, **extra))


def entries(cache: Path):
    return sorted(p for p in cache.iterdir() if p.is_dir())


@pytest.mark.slow
def test_the_isolated_install_ships_sources_and_no_extension(venv, tmp_path):
    code = "import json, os, cdm_kernels; print(json.dumps(sorted(os.listdir(os.path.dirname(cdm_kernels.__file__)))))"
    listing, err = run(venv, tmp_path / "cache", code)
    assert "csrc" in listing and not [name for name in listing if name.startswith("_C")]
    assert COMPILING not in err  # importing compiles nothing
    package = Path(venv).parents[1] / "lib"
    shipped = {p.relative_to(next(package.glob("python*/site-packages/cdm_kernels/csrc"))) for p in package.glob("python*/site-packages/cdm_kernels/csrc/**/*") if p.is_file()}
    in_checkout = {p.relative_to(REPO / "csrc") for p in (REPO / "csrc").rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert shipped == in_checkout


@pytest.fixture(scope="module")
def built_cache(venv, tmp_path_factory):
    """Two processes start together on an empty cache; both call an op first thing."""
    cache = tmp_path_factory.mktemp("cache") / "cdm"
    processes = [start(venv, cache) for _ in range(2)]
    results = [finish(process) for process in processes]
    return cache, results


@pytest.mark.slow
def test_processes_starting_together_build_once(built_cache):
    cache, results = built_cache
    assert sum(err.count(COMPILING) for _, err in results) == 1
    for result, err in results:
        assert result["backends"][0] == "cpp" and result["why_cpp"] is None, err
        assert result["library"].startswith(str(cache))
    (entry,) = entries(cache)
    assert build.verified_library(str(entry)) == results[0][0]["library"]


def snapshot(folder: Path):
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.mark.slow
def test_a_later_process_loads_the_cache_without_compiling(venv, built_cache):
    cache, _ = built_cache
    before = snapshot(cache)
    result, err = run(venv, cache)
    assert COMPILING not in err and result["backends"][0] == "cpp"
    assert snapshot(cache) == before  # loading writes nothing: a read-only cache serves too
    print(f"first op call with the cached library loaded: {result['seconds'] * 1e3:.1f} ms")


@pytest.mark.slow
def test_the_prebuild_command_and_the_switch_off(venv, built_cache, tmp_path):
    cache, _ = built_cache
    out = subprocess.run(
        [str(venv), "-m", "cdm_kernels.build"], env=clean_env(CDM_KERNELS_CACHE=str(cache)),
        cwd=tmp_path, capture_output=True, text=True, timeout=BUILD_TIMEOUT,
    )
    assert out.returncode == 0 and "cached at" in out.stdout and COMPILING not in out.stderr, out.stderr
    # switched off, a cached build still loads ...
    result, err = run(venv, cache, CDM_KERNELS_JIT="0")
    assert result["backends"][0] == "cpp" and COMPILING not in err
    # ... and with none cached, cpp is missing and says why
    code = FIRST_CALL + textwrap.dedent(
        """
        try:
            ck.scores_to_posterior(graph, log_score, x, 0.3, backend="cpp")
        except ValueError as error:
            print(json.dumps({"error": str(error)}))
        """
    )
    result, err = run(venv, tmp_path / "empty", code, CDM_KERNELS_JIT="0")
    assert "CDM_KERNELS_JIT=0" in result["error"] and "backend 'cpp' is not available" in result["error"]
    assert COMPILING not in err and err.count("RuntimeWarning") == 1 and "CDM_KERNELS_JIT=0" in err


@pytest.mark.slow
def test_a_corrupt_cached_library_is_rebuilt(venv, built_cache, tmp_path):
    cache = tmp_path / "cdm"
    shutil.copytree(built_cache[0], cache)
    (entry,) = entries(cache)
    library = entry / json.loads((entry / "stamp.json").read_text())["library"]
    data = bytearray(library.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    library.write_bytes(bytes(data))
    result, err = run(venv, cache)
    assert err.count(COMPILING) == 1 and result["backends"][0] == "cpp"
    assert build.verified_library(str(entry)) == result["library"]


def fallback(venv, cache, **extra):
    """Runs FIRST_CALL where the extension cannot be built: it must fall back, warning once."""
    code = FIRST_CALL + "ck.available_backends('cpu'); ck.why_unavailable('cpp')\n"
    result, err = run(venv, cache, code, **extra)
    assert "cpp" not in result["backends"] and result["backends"][0] == "reference"
    assert err.count("RuntimeWarning") == 1, err
    assert "ahead of time does not load" not in result["why_cpp"]  # none was installed
    return result, err


@pytest.mark.slow
@pytest.mark.parametrize("how", ["CXX names a missing program", "PATH without a compiler"])
def test_without_a_compiler_the_reference_backend_serves(venv, tmp_path, how):
    if how.startswith("CXX"):
        extra = dict(CXX=str(tmp_path / "no-such-compiler"))
    else:
        extra = dict(PATH=str(Path(venv).parent))
        if shutil.which("c++", path=extra["PATH"]):
            pytest.skip("the venv's bin folder holds a c++")
    result, err = fallback(venv, tmp_path / "cache", **extra)
    assert "no C++ compiler" in result["why_cpp"] and "no C++ compiler" in err


@pytest.mark.slow
def test_a_failing_compiler_falls_back_and_a_later_process_tries_again(venv, tmp_path):
    failing = shutil.which("false")
    if failing is None:
        pytest.skip("no `false` program")
    cache = tmp_path / "cache"
    for _ in range(2):
        result, err = fallback(venv, cache, CXX=failing)
        assert err.count(COMPILING) == 1 and "compiling it failed" in result["why_cpp"]
    assert list(cache.glob("*.failed"))


@pytest.mark.slow
def test_an_unwritable_cache_falls_back(venv, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result, err = fallback(venv, blocker / "cache")
    assert "not writable" in result["why_cpp"] and "CDM_KERNELS_CACHE" in err
