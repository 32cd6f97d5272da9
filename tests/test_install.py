"""Installing fastkd the ways people install it, each checked in a fresh virtual environment
from a folder outside the checkout (issue 15):

- the source distribution holds every source the build needs; unpacked in an empty folder it
  builds ahead of time (``pip wheel --no-build-isolation``: the wheel ``pip install
  --no-build-isolation`` would build and install), and that wheel, installed in the fresh
  venv, runs the compiled ops from another folder;
- ``pip install <sdist>`` with pip's defaults (build isolation: the build cannot import
  torch) gives a pure-Python package that compiles its ops on first use: two processes
  starting at once on an empty cache both get them, built once; a third loads them from
  the cache; a first use inside torch.compile works; ``FASTKD_NO_JIT=1`` turns it off;
- an ahead-of-time build for another torch is refused with both versions named, then the
  JIT build runs.

Slow by nature, so one module with one venv: about 3 minutes on the 2-core machine (the
venv with torch about a minute, the ahead-of-time build 40 s, the JIT build 20 s; twice that
when the machine is busy), and 5 GB of disk while it runs. Builds skip the CUDA kernels
(FASTKD_NO_CUDA=1: the CUDA build is test_cpp_extension.py's). Every result is checked
against the float64 reference of this checkout. The timings are printed (``pytest -s``).
"""

import json
import os
import re
import shutil
import subprocess
import tarfile
import textwrap
import time
import venv
from pathlib import Path

import pytest
import torch
from kd_testing import GRAD_TOL, LOSS_TOL, make_labels, make_logits, rel_err

import fastkd
from fastkd import _build_spec, _extension, _jit

ROOT = Path(__file__).resolve().parent.parent
TORCH_PIN = f"torch=={torch.__version__.split('+')[0]}"
LOSS_ARGS = dict(divergence="jsd", temperature=2.0, ce_weight=0.3, beta=0.4)
# The CPU kernel module both builds load on this CPU (the JIT build compiles only that one).
BEST_ISA = _extension._CPU_ISA_ORDER.get(torch.backends.cpu.get_cpu_capability(), ("default",))[0]


def _sources_in_checkout() -> list[str]:
    return sorted(
        p.name for p in (ROOT / "csrc").iterdir() if p.suffix in _build_spec.SOURCE_SUFFIXES
    )


def test_every_csrc_source_is_in_one_build_list():
    """A .cpp or .cu left out of fastkd/_build_spec.py's lists would be in the sdist and the
    wheel but in no module, ahead of time or just in time."""
    listed = [
        *_build_spec.OPS_SOURCES,
        *_build_spec.CUDA_SOURCES,
        *_build_spec.CPU_KERNEL_SOURCES,
    ]
    assert len(listed) == len(set(listed)), listed
    compiled = [name for name in _sources_in_checkout() if name.endswith((".cpp", ".cu"))]
    assert sorted(listed) == compiled


def test_the_checkout_compiles_from_its_csrc():
    assert _jit.sources_dir() in (ROOT / "fastkd" / "csrc", ROOT / "csrc")


def test_jit_cuda_flags_match_the_arch_tag():
    """The JIT build passes its own -gencode flags (torch would pick the visible GPUs'), so
    build_info()'s cuda_archs, from the arch tag, say what was compiled."""
    archs = "8.0;9.0+PTX"
    flags = _jit._gencode_flags(archs)
    codes = [re.search(r"code=(\w+)$", flag).group(1) for flag in flags]
    assert codes == _build_spec.arch_tag(archs).split("__") == ["sm_80", "sm_90", "compute_90"]


# --- the fresh environment ------------------------------------------------------------------


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without what would pull in the checkout or this venv's
    fastkd, and with builds that skip the CUDA kernels and use both cores."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "VIRTUAL_ENV", "FASTKD_NO_JIT", "FASTKD_BACKEND")
    }
    env.update(FASTKD_NO_CUDA="1", MAX_JOBS="2", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.update(extra)
    return env


def _run(cmd, cwd, timeout=900, **env) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    done = subprocess.run(
        [str(c) for c in cmd],
        cwd=cwd,
        env=_clean_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    seconds = time.perf_counter() - start
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done, seconds


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("install")


@pytest.fixture(scope="module")
def env_python(work):
    """A fresh venv with this torch (pip installs it as a user would; 5 GB, removed
    afterwards) and fastkd's other dependencies, plus `build`. Not `--system-site-packages`:
    that shares the base interpreter's packages, which hold no torch (and pointing the new
    venv at this venv's site-packages would show its pip this checkout's editable fastkd,
    to uninstall)."""
    folder = work / "venv"
    venv.EnvBuilder(with_pip=True).create(folder)
    python = folder / "bin" / "python"
    pip = [python, "-m", "pip", "install", "--no-cache-dir", "-q"]
    start = time.perf_counter()
    done = subprocess.run(
        [*pip, TORCH_PIN, "numpy", "tqdm", "typing-extensions", "ninja", "build"],
        env=_clean_env(),
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"pip cannot install {TORCH_PIN} into a fresh venv: {done.stderr[-2000:]}")
    print(f"\nfresh venv with {TORCH_PIN}: {time.perf_counter() - start:.0f} s")
    yield python
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def sdist(env_python, work):
    """`python -m build --sdist` of the checkout, isolated as a user's would be."""
    out = work / "dist"
    _, seconds = _run([env_python, "-m", "build", "--sdist", "--outdir", out, ROOT], cwd=work)
    print(f"\nsdist: {seconds:.0f} s")
    (archive,) = out.glob("fastkd-*.tar.gz")
    return archive


@pytest.fixture(scope="module")
def inputs(work):
    """Seeded logits and labels, and the float64 reference's loss and gradient."""
    gen = torch.Generator().manual_seed(15)
    s = make_logits((6, 300), torch.float32, "cpu", gen)
    t = make_logits((6, 300), torch.float32, "cpu", gen)
    labels = make_labels((6,), 300, "some", gen, "cpu")
    s64 = s.double().requires_grad_(True)
    ref, _, _ = fastkd.kd_loss_reference(s64, t.double(), labels, **LOSS_ARGS)
    ref.backward()
    path = work / "inputs.pt"
    torch.save({"s": s, "t": t, "labels": labels}, path)
    return path, ref.detach(), s64.grad


_CHECK = """
    import json, sys, time, warnings
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        start = time.perf_counter()
        import torch, fastkd
        imported = time.perf_counter()
        data = torch.load(INPUTS)
        s = data["s"].requires_grad_(True)
        first_call = FIRST_CALL
        loss = first_call(s, data["t"], data["labels"])  # the first use of the ops
        first_call = time.perf_counter()
        loss.backward()
    info = fastkd.build_info()
    torch.save({"loss": loss.detach(), "grad": s.grad}, OUTPUT)
    print("RESULT", json.dumps({
        "file": fastkd.__file__,
        "info": {k: info[k] for k in ("compiled", "loaded", "error", "aot_error", "jit_dir",
                                      "cpu_kernel", "torch_version", "cuda_kernels")},
        "auto_on_cpu": fastkd._backends.resolve("auto", torch.device("cpu"), torch.float32),
        "import_s": imported - start,
        "first_call_s": first_call - imported,
        "warnings": [str(w.message) for w in caught if "fastkd" in str(w.message)],
    }))
"""

_EAGER = "lambda s, t, labels: fastkd.kd_loss(s, t, labels, **LOSS_ARGS)"
# fullgraph: the first use, and so the JIT load, happens while Dynamo traces kd_loss.
_COMPILED = (
    "torch.compile(lambda s, t, labels: fastkd.kd_loss(s, t, labels, **LOSS_ARGS), "
    "fullgraph=True, backend='eager')"
)


def _check_script(inputs_path: Path, output: Path, first_call: str = _EAGER) -> str:
    head = f"INPUTS = {str(inputs_path)!r}\nOUTPUT = {str(output)!r}\nLOSS_ARGS = {LOSS_ARGS!r}\n"
    return head + textwrap.dedent(_CHECK).replace("FIRST_CALL", first_call)


def _parse(done: subprocess.CompletedProcess) -> dict:
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def _start_check(python, folder: Path, inputs, name: str, first_call=_EAGER, **env):
    """A check process in an empty folder (not the checkout): it imports the installed
    fastkd, or the one on ``PYTHONPATH`` in ``env``."""
    cwd = folder / name
    cwd.mkdir()
    script = _check_script(inputs[0], cwd / "out.pt", first_call)
    return cwd, subprocess.Popen(
        [str(python), "-c", script],
        cwd=cwd,
        env=_clean_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish_check(cwd: Path, process, inputs, timeout=900) -> dict:
    stdout, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, f"{stdout[-3000:]}\n{stderr[-6000:]}"
    result = _parse(subprocess.CompletedProcess([], 0, stdout, stderr))
    got = torch.load(cwd / "out.pt")
    _, ref_loss, ref_grad = inputs
    result["loss_err"] = rel_err(got["loss"], ref_loss)
    result["grad_err"] = rel_err(got["grad"], ref_grad)
    assert result["loss_err"] <= LOSS_TOL, result
    assert result["grad_err"] <= GRAD_TOL[torch.float32], result
    assert result["auto_on_cpu"] == "cpu", result  # the compiled kernel, not the reference
    return result


def _check(python, folder, inputs, name, first_call=_EAGER, **env) -> dict:
    cwd, process = _start_check(python, folder, inputs, name, first_call, **env)
    return _finish_check(cwd, process, inputs)


# --- the source distribution, built ahead of time -----------------------------------------


def test_sdist_holds_every_source(sdist):
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    needed = {f"csrc/{name}" for name in _sources_in_checkout()}
    needed |= {"setup.py", "pyproject.toml", "MANIFEST.in", "fastkd/_build_spec.py"}
    assert needed <= names, sorted(needed - names)
    assert not [n for n in names if n.endswith((".so", ".o", ".pyd"))]


@pytest.fixture(scope="module")
def aot_wheel(env_python, sdist, work):
    """The sdist unpacked in an empty folder and built there against the venv's torch."""
    unpacked = work / "unpacked"
    unpacked.mkdir()
    with tarfile.open(sdist) as archive:
        archive.extractall(unpacked, filter="data")
    (source,) = unpacked.iterdir()
    wheels = work / "wheels"
    # -v: pip shows the build's output, with setup.py's summary, only when verbose.
    pip_wheel = [env_python, "-m", "pip", "wheel", "-v", "--no-build-isolation", "--no-deps"]
    done, seconds = _run([*pip_wheel, "--no-cache-dir", "-w", wheels, source], cwd=unpacked)
    print(f"\nahead-of-time build of the unpacked sdist (pip wheel): {seconds:.0f} s")
    assert "CUDA kernels SKIPPED: FASTKD_NO_CUDA=1" in done.stdout + done.stderr
    (wheel,) = wheels.glob("fastkd-*.whl")
    return wheel


def test_sdist_builds_ahead_of_time_and_its_wheel_runs_elsewhere(
    env_python, aot_wheel, inputs, work
):
    assert "-none-any" not in aot_wheel.name, aot_wheel.name  # it holds compiled modules
    _, seconds = _run(
        [env_python, "-m", "pip", "install", "--no-deps", "--force-reinstall", aot_wheel],
        cwd=work,
    )
    result = _check(env_python, work, inputs, "aot-check")
    assert "site-packages" in result["file"], result["file"]
    info = result["info"]
    assert info["compiled"] and info["loaded"] == "aot", info
    assert info["torch_version"] == torch.__version__.split("+")[0]
    assert info["cpu_kernel"] == BEST_ISA, info
    assert not result["warnings"], result["warnings"]  # nothing compiled, nothing to say
    print(
        f"\nwheel install {seconds:.0f} s; import {result['import_s']:.1f} s, first call "
        f"{result['first_call_s']:.2f} s (ahead of time)"
    )


# --- pip's default build isolation: compiled on first use ---------------------------------


@pytest.fixture(scope="module")
def pure_install(env_python, sdist, work):
    """`pip install <sdist>` with pip's defaults: the build's environment has setuptools and
    wheel from the index, not torch."""
    install = [env_python, "-m", "pip", "install", "--no-cache-dir", "--force-reinstall"]
    done, seconds = _run([*install, "--no-deps", sdist], cwd=work)
    print(f"\npip install <sdist> (build isolation): {seconds:.0f} s")
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(_run([env_python, "-c", where], cwd=work)[0].stdout.strip())
    return site


@pytest.fixture(scope="module")
def first_use(env_python, pure_install, inputs, work):
    """Two processes using the ops at once on an empty cache, then a third one."""
    cache = work / "torch_extensions"
    started = [
        _start_check(env_python, work, inputs, f"first-{i}", TORCH_EXTENSIONS_DIR=str(cache))
        for i in (1, 2)
    ]
    firsts = [_finish_check(cwd, process, inputs) for cwd, process in started]
    (build,) = cache.iterdir()
    ninja_logs = {p.parent.name: p.read_text() for p in build.glob("*/.ninja_log")}
    cached = _check(env_python, work, inputs, "cached", TORCH_EXTENSIONS_DIR=str(cache))
    return cache, firsts, ninja_logs, cached


def _built_outputs(ninja_log: str) -> list[str]:
    return [line.split("\t")[3] for line in ninja_log.splitlines() if not line.startswith("#")]


def test_isolated_install_is_pure_python_with_the_sources(pure_install):
    package = pure_install / "fastkd"
    wheel_meta = (pure_install / "fastkd-0.1.0.dist-info" / "WHEEL").read_text()
    assert "Root-Is-Purelib: true" in wheel_meta and "py3-none-any" in wheel_meta, wheel_meta
    assert not list(package.glob("_C*")), list(package.glob("_C*"))
    assert not (package / _build_spec.AOT_RECORD).exists()
    assert sorted(p.name for p in (package / "csrc").iterdir()) == _sources_in_checkout()


def test_first_use_compiles_once_for_two_processes_then_the_cache_serves(first_use):
    cache, firsts, ninja_logs, cached = first_use
    for result in firsts:
        info = result["info"]
        assert info["compiled"] and info["loaded"] == "jit", info
        assert info["cpu_kernel"] == BEST_ISA and not info["cuda_kernels"], info
        assert Path(info["jit_dir"]).parent == cache, info
        assert "no ahead-of-time build is installed" in info["aot_error"], info
        said = " ".join(result["warnings"])
        assert "compiling its C++ ops" in said and "FASTKD_NO_JIT=1" in said, said
        assert re.search(r"ready after \d+ s", said), said
    # Each object file and module in the ninja logs once: the process that waited on the
    # lock built nothing again.
    modules = sorted(name.rsplit("-", 1)[0] for name in ninja_logs)
    assert modules == sorted([_build_spec.OPS_MODULE, _build_spec.cpu_module(BEST_ISA)])
    for module, log in ninja_logs.items():
        outputs = _built_outputs(log)
        assert outputs and len(outputs) == len(set(outputs)), (module, log)
    assert cached["info"]["loaded"] == "jit", cached
    assert not cached["warnings"], cached["warnings"]  # found in the cache: nothing to say
    print(
        "\nfirst use (two processes at once): "
        + ", ".join(f"first call {r['first_call_s']:.0f} s" for r in firsts)
        + f"; cached start: import {cached['import_s']:.1f} s, first call "
        f"{cached['first_call_s']:.2f} s"
    )


def test_first_use_inside_torch_compile(env_python, first_use, inputs, work):
    """The first use of the ops inside torch.compile(fullgraph=True): the load runs while
    Dynamo traces kd_loss, without a graph break."""
    cache = first_use[0]
    result = _check(
        env_python, work, inputs, "compiled", _COMPILED, TORCH_EXTENSIONS_DIR=str(cache)
    )
    assert result["info"]["loaded"] == "jit", result


def test_no_jit_switch_leaves_the_ops_off(env_python, pure_install, work):
    cwd = work / "no-jit"
    cwd.mkdir()
    code = """
        import warnings
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            import torch, fastkd
        messages = [str(w.message) for w in caught if "fastkd._C" in str(w.message)]
        assert len(messages) == 1 and "FASTKD_NO_JIT=1" in messages[0], messages
        info = fastkd.build_info()
        assert not info["compiled"] and info["loaded"] is None, info
        try:
            fastkd.kd_loss(torch.randn(2, 9), torch.randn(2, 9), backend="cpu")
        except ValueError as error:
            assert "backend='cpu' is not available" in str(error), error
            print("ok")
    """
    cache = work / "untouched-cache"
    done, _ = _run(
        [env_python, "-c", textwrap.dedent(code)],
        cwd=cwd,
        FASTKD_NO_JIT="1",
        TORCH_EXTENSIONS_DIR=str(cache),
    )
    assert done.stdout.strip() == "ok", done.stdout + done.stderr
    assert not cache.exists()


# --- an ahead-of-time build for another torch ---------------------------------------------


def test_aot_build_for_another_torch_is_refused_then_compiled(
    env_python, aot_wheel, first_use, inputs, work
):
    """The wheel's record says another torch: its modules are left alone, a warning names
    both versions, and the ops compile for this torch (here found in first_use's cache)."""
    target = work / "other-torch"
    install = [env_python, "-m", "pip", "install", "--no-deps", "--target", target, aot_wheel]
    _run(install, cwd=work)
    record = target / "fastkd" / _build_spec.AOT_RECORD
    assert json.loads(record.read_text())["torch"] == torch.__version__
    record.write_text(json.dumps({"torch": "2.4.0+cu121", "cuda_kernels": True}))
    result = _check(
        env_python,
        work,
        inputs,
        "other-torch-check",
        PYTHONPATH=str(target),
        TORCH_EXTENSIONS_DIR=str(first_use[0]),
    )
    assert result["file"].startswith(str(target)), result["file"]
    assert result["info"]["loaded"] == "jit", result
    said = " ".join(result["warnings"])
    assert f"built against torch 2.4.0+cu121 and this is torch {torch.__version__}" in said, said
    assert "compiling them for this torch on first use" in said, said
