"""Compiles fastkd's ops on first use when no ahead-of-time build can be loaded.

A wheel built where torch could not be imported (pip's default build isolation) carries the
C++/CUDA sources in fastkd/csrc/ instead of compiled modules; a source checkout has them in
csrc/. This builds the same modules as setup.py, from the same lists (fastkd/_build_spec.py),
with torch.utils.cpp_extension.load and ninja: fastkd._C, with the CUDA kernels when torch is
a CUDA build, nvcc is found and a GPU is visible, and the CPU kernel module for the best
instruction set this CPU runs. They are cached where torch caches extensions
(``TORCH_EXTENSIONS_DIR``, else torch's default), in a folder keyed by the Python, the torch
and the sources, so later processes only load them; torch's file lock in each module's folder
makes a second process that starts while one builds wait, then load what it built.

``FASTKD_NO_JIT=1`` turns this off.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import sysconfig
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from . import _build_spec as spec

NO_JIT_ENV = "FASTKD_NO_JIT"
_PACKAGE = Path(__file__).resolve().parent
# Bumped when the cache's layout or what keys it changes.
_CACHE_LAYOUT = "1"


class JitUnavailable(Exception):
    """Why the ops cannot be compiled here (no build was attempted)."""


@dataclass
class JitLoad:
    ops: ModuleType  # fastkd._C, built here
    cpu_module: ModuleType | None  # the CPU kernel module handed to ops
    cpu_error: str | None  # why none was
    directory: Path  # the cache folder of this build
    seconds: float  # compiling (or waiting for another process's build) and loading
    compiled: bool  # False: every module was in the cache
    cuda_note: str  # with or without the CUDA kernels, and why


def disabled() -> bool:
    return spec.env_flag(NO_JIT_ENV)


def sources_dir() -> Path | None:
    """fastkd/csrc/ of an installed wheel, else csrc/ of the source checkout holding fastkd."""
    for folder in (_PACKAGE / "csrc", _PACKAGE.parent / "csrc"):
        if all((folder / name).is_file() for name in spec.OPS_SOURCES):
            return folder
    return None


def cache_root() -> Path:
    """torch's folder for JIT extensions (torch.utils.cpp_extension._get_build_directory)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    from torch.utils.cpp_extension import get_default_build_root

    accelerator = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{python}_{accelerator}"


def _digest(*parts: bytes | str) -> str:
    sha = hashlib.sha256()
    for part in parts:
        sha.update(part.encode() if isinstance(part, str) else part)
        sha.update(b"\0")
    return sha.hexdigest()


def _source_files(sources: Path) -> list[Path]:
    return sorted(p for p in sources.iterdir() if p.suffix in spec.SOURCE_SUFFIXES)


def _build_folder(sources: Path) -> Path:
    """The cache folder of these sources for this Python and torch (an extension is tied to
    the torch it was compiled against)."""
    parts = [_CACHE_LAYOUT, sys.implementation.cache_tag, torch.__version__]
    for path in _source_files(sources):
        parts += [path.name, path.read_bytes()]
    name = f"fastkd_torch-{torch.__version__}_{_digest(*parts)[:16]}"
    return cache_root() / name


def _snapshot_sources(sources: Path, folder: Path) -> Path:
    """A copy of the sources in the cache folder: every process then compiles the same paths
    (ninja rebuilds what a changed command line names). Each file is created once, by a link
    that fails if it exists, so a copy never changes under a build."""
    target = folder / "src"
    target.mkdir(parents=True, exist_ok=True)
    for path in _source_files(sources):
        final = target / path.name
        if final.exists():
            continue
        fd, temp = tempfile.mkstemp(dir=target, prefix=f".{path.name}.")
        with os.fdopen(fd, "wb") as out:
            out.write(path.read_bytes())
        try:
            os.link(temp, final)
        except FileExistsError:
            pass  # another process put the same file there first
        finally:
            os.unlink(temp)
    return target


def _cuda_plan() -> tuple[str | None, str]:
    """(TORCH_CUDA_ARCH_LIST of the CUDA kernels, or None without them; why)."""
    if spec.env_flag("FASTKD_NO_CUDA"):
        return None, "without the CUDA kernels (FASTKD_NO_CUDA=1)"
    if torch.version.cuda is None:
        return None, f"without CUDA kernels (torch {torch.__version__} is not a CUDA build)"
    if not torch.cuda.is_available():
        return None, "without the CUDA kernels (no GPU is visible)"
    nvcc, why_not = spec.locate_cuda_toolkit()
    if nvcc is None:
        return None, f"without the CUDA kernels ({why_not})"
    from torch.utils import cpp_extension  # reads CUDA_HOME when first imported

    if cpp_extension.CUDA_HOME is None:
        return None, "without the CUDA kernels (torch.utils.cpp_extension found no CUDA_HOME)"
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or spec.DEFAULT_CUDA_ARCHS
    return archs, f"with the CUDA kernels for TORCH_CUDA_ARCH_LIST={archs} (nvcc {nvcc})"


def _gencode_flags(arch_list: str) -> list[str]:
    """nvcc's -gencode flags for TORCH_CUDA_ARCH_LIST; given explicitly, they replace torch's
    own choice (the visible GPUs), so the build matches the archs build_info() reports."""
    flags = []
    for arch in spec.split_archs(arch_list):
        num = arch.split("+")[0].replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if arch.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """torch runs `ninja` from PATH; pip puts the ninja package's in the environment's
    scripts folder, off PATH when the environment is not activated."""
    if shutil.which("ninja"):
        yield
        return
    folders = [sysconfig.get_path("scripts")]
    with contextlib.suppress(ImportError):
        import ninja

        folders.append(ninja.BIN_DIR)
    found = next((f for f in folders if shutil.which("ninja", path=f)), None)
    if found is None:
        raise JitUnavailable(
            "ninja, which torch.utils.cpp_extension builds with, was not found on PATH nor in "
            f"{folders}: `pip install ninja`"
        )
    saved = os.environ.get("PATH", "")
    os.environ["PATH"] = found + os.pathsep + saved
    try:
        yield
    finally:
        os.environ["PATH"] = saved


@dataclass(frozen=True)
class _Module:
    name: str
    sources: list[str]
    cflags: list[str]
    cuda_cflags: list[str]
    ldflags: list[str]
    with_cuda: bool

    def folder(self, root: Path) -> Path:
        """One folder per module and flags: two variants (with and without CUDA) never
        rebuild each other's."""
        flags = _digest(*self.sources, *self.cflags, "|", *self.cuda_cflags, "|", *self.ldflags)
        return root / f"{self.name}-{flags[:10]}"

    def cached(self, root: Path) -> bool:
        return (self.folder(root) / f"{self.name}.so").is_file()

    def load(self, root: Path, include: Path) -> ModuleType:
        from torch.utils.cpp_extension import load

        folder = self.folder(root)
        folder.mkdir(parents=True, exist_ok=True)
        return load(
            self.name,
            self.sources,
            extra_cflags=self.cflags,
            extra_cuda_cflags=self.cuda_cflags,
            extra_ldflags=self.ldflags,
            extra_include_paths=[str(include)],
            build_directory=str(folder),
            with_cuda=self.with_cuda,
            verbose=False,
        )


def _ops_module(src: Path, archs: str | None) -> _Module:
    cxx, nvcc = spec.ops_cflags(archs)
    sources = list(spec.OPS_SOURCES) + (list(spec.CUDA_SOURCES) if archs else [])
    return _Module(
        spec.OPS_MODULE,
        [str(src / name) for name in sources],
        cxx,
        nvcc + _gencode_flags(archs) if archs else [],
        [],
        archs is not None,
    )


def _cpu_kernel_module(src: Path, isa: str) -> _Module:
    _, capability, flags = next(entry for entry in spec.cpu_isas() if entry[0] == isa)
    return _Module(
        spec.cpu_module(isa),
        [str(src / name) for name in spec.CPU_KERNEL_SOURCES],
        spec.cpu_cflags(isa, capability, flags),
        [],
        spec.openmp_flags(),
        False,
    )


def error_tail(error: BaseException, chars: int = 3000) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= chars else "..." + text[-chars:]


def _importlib_frame(frame) -> bool:
    """A frame of the import machinery, which warnings.warn skips when it counts frames."""
    name = frame.f_code.co_filename
    return "importlib" in name and "_bootstrap" in name


def outside_stacklevel() -> int:
    """warnings.warn's stacklevel of the first frame outside fastkd, for the function that
    calls this and then warns: the warning then points at the user's call (or import)."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and (
        frame.f_code.co_filename.startswith(str(_PACKAGE)) or _importlib_frame(frame)
    ):
        frame = frame.f_back
        level += not _importlib_frame(frame)
    return level


def compile_and_load(cpu_isas: Sequence[str], why: str) -> JitLoad:
    """Builds (or finds in the cache) and loads fastkd._C and the first CPU kernel module of
    ``cpu_isas`` (best first) that builds, and hands its kernels to fastkd._C. ``why``: why
    no ahead-of-time build is used, for the message. Raises :class:`JitUnavailable`, or the
    build's error for fastkd._C."""
    if disabled():
        raise JitUnavailable(f"{NO_JIT_ENV}=1 turns the JIT build off")
    src_in = sources_dir()
    if src_in is None:
        raise JitUnavailable(
            f"the C++ sources are not installed with this fastkd (neither {_PACKAGE / 'csrc'} "
            f"nor {_PACKAGE.parent / 'csrc'} holds {spec.OPS_SOURCES[0]})"
        )
    built_isas = {isa for isa, _, _ in spec.cpu_isas()}
    isas = [isa for isa in cpu_isas if isa in built_isas]
    archs, cuda_note = _cuda_plan()
    start = time.perf_counter()
    with _ninja_on_path():
        root = _build_folder(src_in)
        src = _snapshot_sources(src_in, root)
        ops = _ops_module(src, archs)
        kernels = [_cpu_kernel_module(src, isa) for isa in isas]
        cached = ops.cached(root) and bool(kernels) and kernels[0].cached(root)
        if not cached:
            warnings.warn(
                f"fastkd: compiling its C++ ops for torch {torch.__version__} on first use "
                f"({why}): fastkd._C {cuda_note}, and the CPU kernels for "
                f"{isas[0] if isas else 'no instruction set'}, in {root}. This takes a minute "
                f"or two (more with the CUDA kernels) and happens once: later processes load "
                f"them from there. {NO_JIT_ENV}=1 turns it off; `pip install "
                f"--no-build-isolation` compiles them at install time instead.",
                RuntimeWarning,
                stacklevel=outside_stacklevel(),
            )
        module = ops.load(root, src)
        cpu_module, tried = None, []
        for kernel in kernels:
            try:
                candidate = kernel.load(root, src)
                module.set_cpu_kernels(candidate.kernels)
            except (ImportError, RuntimeError, OSError) as error:
                tried.append(f"{kernel.name}: {error_tail(error, 600)}")
                continue
            cpu_module = candidate
            break
    seconds = time.perf_counter() - start
    if not cached:
        warnings.warn(
            f"fastkd: its C++ ops are ready after {seconds:.0f} s (compiled here, or by another "
            f"process while this one waited; cached in {root})",
            RuntimeWarning,
            stacklevel=outside_stacklevel(),
        )
    cpu_error = None
    if cpu_module is None:
        cpu_error = "no CPU kernel module could be built: " + ("; ".join(tried) or "none fits")
    return JitLoad(module, cpu_module, cpu_error, root, seconds, not cached, cuda_note)
