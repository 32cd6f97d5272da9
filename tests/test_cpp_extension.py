"""The compiled extension (csrc/): its build, its ops, its backends, and the CPU kernel at
sizes the Triton interpreter cannot reach.

The KDLoss matrix of test_kd_loss.py runs on the C++ CPU kernel too (the "cpu-cpu" target of
kd_testing.kernel_targets); this file holds what is particular to the extension.
"""

import copy
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from kd_testing import (
    GRAD_TOL,
    LOSS_TOL,
    check_against_reference,
    make_labels,
    make_logits,
    rel_err,
)

import fastkd
from fastkd import _backends, _extension

ROOT = Path(__file__).resolve().parent.parent

needs_cpu_kernel = pytest.mark.skipif(
    not _extension.cpu_available()[0],
    reason=f"C++ CPU kernel unavailable: {_extension.cpu_available()[1]}",
)


def _run_python(*pieces: str, **env) -> subprocess.CompletedProcess:
    """Runs the code pieces in a fresh interpreter on this checkout (imports in a chosen
    order)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    cwd = env.get("PYTHONPATH", str(ROOT))  # not the checkout when running a copy of it
    return subprocess.run(
        [sys.executable, "-c", "".join(textwrap.dedent(piece) for piece in pieces)],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=300,
    )


# --- build --------------------------------------------------------------------------------


def test_extension_is_built():
    info = fastkd.build_info()
    assert info["compiled"], f"fastkd._C is not loaded ({info['error']}): {_extension.REBUILD_HINT}"
    assert info["torch_version"] == torch.__version__.split("+")[0]
    assert info["cpu_kernels"], "no fastkd._C_cpu_<isa> module was built"


def test_cuda_kernels_built_whenever_nvcc_is_present():
    """setup.py builds the CUDA kernels when nvcc is found and torch is a CUDA build, GPU or
    not; CI asserts it here so that a .cu that does not compile fails the run."""
    if shutil.which("nvcc") is None or torch.version.cuda is None:
        pytest.skip(f"no nvcc on PATH or torch {torch.__version__} is not a CUDA build")
    if os.environ.get("FASTKD_NO_CUDA", "0") not in ("", "0"):
        pytest.skip("FASTKD_NO_CUDA is set: the CUDA kernels were skipped on purpose")
    info = fastkd.build_info()
    assert info["cuda_kernels"], info
    assert info["cuda_version"]
    if "TORCH_CUDA_ARCH_LIST" not in os.environ:  # setup.py's default: sm_80, sm_90 + PTX
        assert info["cuda_archs"] == ["sm_80", "sm_90", "compute_90"]


def test_cpu_kernel_for_this_cpu():
    """The module loaded is the best one built for what torch reports of this CPU."""
    info = fastkd.build_info()
    capability = torch.backends.cpu.get_cpu_capability()
    expected = [isa for isa in _extension._CPU_ISA_ORDER.get(capability, ("default",))]
    built = [isa for isa in expected if isa in info["cpu_kernels"]]
    assert built, f"no CPU kernel module built for {capability}: {info}"
    assert info["cpu_kernel"] == built[0]


# --- import order and a missing extension -------------------------------------------------

_SMOKE = """
    s = torch.randn(3, 50) * 3
    t = torch.randn(3, 50) * 3
    got = fastkd.kd_loss(s, t, divergence="jsd", backend="cpu")
    ref, _, _ = fastkd.kd_loss_reference(s.double(), t.double(), divergence="jsd")
    assert abs(got.item() - ref.item()) <= 1e-5 * abs(ref.item()), (got, ref)
    print("ok", sorted(n for n in dir(torch.ops.fastkd) if not n.startswith("_")))
"""


@needs_cpu_kernel
def test_cpp_ops_registered_first():
    """fastkd._C's TORCH_LIBRARY_FRAGMENT before fastkd's Python custom ops."""
    code = """
        import importlib.util, torch
        torch.ops.load_library(importlib.util.find_spec("fastkd._C").origin)
        assert hasattr(torch.ops.fastkd, "kd_rows")
        import fastkd
    """
    done = _run_python(code, _SMOKE)
    assert done.returncode == 0, done.stderr
    assert "kd_loss" in done.stdout and "kd_rows" in done.stdout


@needs_cpu_kernel
def test_python_ops_registered_first():
    """Another Python fragment of the fastkd namespace before the C++ one."""
    code = """
        import torch

        @torch.library.custom_op("fastkd::probe", mutates_args=())
        def probe(x: torch.Tensor) -> torch.Tensor:
            return x.clone()

        import fastkd
        assert torch.ops.fastkd.probe(torch.ones(2)).sum() == 2
    """
    done = _run_python(code, _SMOKE)
    assert done.returncode == 0, done.stderr
    assert "probe" in done.stdout and "kd_rows" in done.stdout


@pytest.mark.parametrize("in_checkout", [False, True], ids=["package", "source-checkout"])
def test_missing_extension_warns_once_and_falls_back(tmp_path, in_checkout):
    """A copy of the package without its compiled modules still imports and runs; when the
    copy sits in a source checkout, the warning says the checkout shadows an installed build."""
    shutil.copytree(ROOT / "fastkd", tmp_path / "fastkd", ignore=shutil.ignore_patterns("*.so"))
    if in_checkout:
        shutil.copy(ROOT / "setup.py", tmp_path / "setup.py")
    code = """
        import os, sys, warnings
        # An editable install (pip install -e) maps fastkd to the checkout ahead of sys.path.
        sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in repr(f)]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import fastkd
            import torch
            assert fastkd.__file__.startswith(os.getcwd()), fastkd.__file__  # the copy
            s, t = torch.randn(2, 9), torch.randn(2, 9)
            fastkd.kd_loss(s, t)  # auto: the reference on CPU tensors
        messages = [str(w.message) for w in caught if "fastkd._C" in str(w.message)]
        assert len(messages) == 1 and "pip install --no-build-isolation" in messages[0], messages
        assert ("is the source checkout at" in messages[0]) == IN_CHECKOUT, messages
        info = fastkd.build_info()
        assert not info["compiled"] and info["cpu_kernels"] == [], info
        try:
            fastkd.kd_loss(s, t, backend="cpu")
        except ValueError as error:
            assert "backend='cpu' is not available" in str(error), error
            print("ok")
    """
    done = _run_python(f"IN_CHECKOUT = {in_checkout}\n", code, PYTHONPATH=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


# --- backend choice -----------------------------------------------------------------------


@needs_cpu_kernel
def test_auto_picks_the_cpu_kernel_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv(_backends.BACKEND_ENV, raising=False)
    assert _backends.resolve("auto", torch.device("cpu"), torch.float32) == "cpu"
    assert _backends.resolve("auto", torch.device("cpu"), torch.bfloat16) == "cpu"
    assert _backends.resolve("auto", torch.device("cpu"), torch.float64) == "torch"


def test_env_var_overrides_auto(monkeypatch):
    monkeypatch.setenv(_backends.BACKEND_ENV, "torch")
    assert _backends.resolve("auto", torch.device("cpu"), torch.float32) == "torch"
    # An explicit argument still wins over the environment.
    assert _backends.resolve("torch", torch.device("cpu"), torch.float32) == "torch"
    monkeypatch.setenv(_backends.BACKEND_ENV, "cuda")
    with pytest.raises(ValueError, match="FASTKD_BACKEND='cuda' is not available"):
        fastkd.kd_loss(torch.randn(2, 5), torch.randn(2, 5))
    monkeypatch.setenv(_backends.BACKEND_ENV, "fastest")
    with pytest.raises(ValueError, match="FASTKD_BACKEND='fastest' must be one of"):
        fastkd.kd_loss(torch.randn(2, 5), torch.randn(2, 5))


def test_unavailable_explicit_backends():
    s, t = torch.randn(2, 5), torch.randn(2, 5)
    with pytest.raises(ValueError, match="backend='cuda' is not available: the CUDA kernel runs"):
        fastkd.kd_loss(s, t, backend="cuda")
    with pytest.raises(ValueError, match="backend='cpu' is not available: the C.. CPU kernel"):
        # A device other than the CPU without a GPU: the registry's check (the public call
        # refuses meta tensors before that, as tensors without data).
        _backends.resolve("cpu", torch.device("meta"), torch.float32)
    if _extension.cpu_available()[0]:
        with pytest.raises(ValueError, match="use backend='torch' for float64"):
            fastkd.kd_loss(s.double(), t.double(), backend="cpu")


# --- the ops ------------------------------------------------------------------------------


def _kd_rows_args(dtype, labels, grad, softcap, divergence="jsd", V=37, n_rows=5):
    gen = torch.Generator().manual_seed(7)
    s = make_logits((n_rows, V), dtype, "cpu", gen)
    t = make_logits((n_rows, V), dtype, "cpu", gen)
    lab = make_labels((n_rows,), V, "some", gen, "cpu") if labels else None
    g = torch.empty_like(s) if grad else None
    code = fastkd.DIVERGENCES[divergence].code
    return (s, t, lab, g, torch.tensor(0.25), code, 2.0, 0.3, softcap, 1.5, 0.5, -100)


@needs_cpu_kernel
@pytest.mark.parametrize(
    "dtype,labels,grad,softcap,divergence",
    [
        (torch.float32, True, True, None, "jsd"),
        (torch.bfloat16, False, True, 20.0, "forward_kl"),
        (torch.float16, True, False, None, "tvd"),
        (torch.float32, False, False, 5.0, "reverse_kl"),
    ],
)
def test_opcheck_kd_rows(dtype, labels, grad, softcap, divergence):
    args = _kd_rows_args(dtype, labels, grad, softcap, divergence)
    torch.library.opcheck(torch.ops.fastkd.kd_rows.default, args)


@needs_cpu_kernel
@pytest.mark.parametrize("phase", [0, 1, 2], ids=["stats", "terms", "grad"])
def test_opcheck_kd_shard_rows(phase):
    # A vocab-parallel shard's phases (fastkd/_vocab_parallel.py): schema, fake, mutation of
    # grad in the gradient phase only. Their numbers are tests/test_vocab_parallel.py's.
    s, t, lab, g, _, code, temp, mix, cap, coef, ce, ignore = _kd_rows_args(
        torch.bfloat16, True, phase == 2, 20.0, "jsd"
    )
    consts = None if phase == 0 else torch.rand(5, 11) + 1.0  # kd_params.h: ShardConst
    args = (s, t, lab, g, consts, phase, 11, code, temp, mix, cap, coef, ce, ignore)
    torch.library.opcheck(torch.ops.fastkd.kd_shard_rows.default, args)


@needs_cpu_kernel
@pytest.mark.parametrize("per_row", [False, True])
def test_opcheck_scale_rows(per_row):
    g = torch.randn(4, 33, dtype=torch.bfloat16)
    factor = torch.rand(4) + 0.5 if per_row else torch.tensor(3.0)
    torch.library.opcheck(torch.ops.fastkd.scale_rows_.default, (g, factor))


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scale_rows_skips_rows_whose_factor_is_one(dtype):
    g = torch.randn(5, 70).to(dtype)
    factor = torch.tensor([1.0, 2.5, 1.0, -0.5, 3.0])
    out = g.clone()
    torch.ops.fastkd.scale_rows_(out, factor)
    expected = (g.float() * factor[:, None]).to(dtype)
    assert torch.equal(out, expected)
    assert torch.equal(out[0], g[0]) and torch.equal(out[2], g[2])


@needs_cpu_kernel
def test_kd_rows_rejects_bad_arguments():
    args = list(_kd_rows_args(torch.float32, True, True, None))
    bad_grad = list(args)
    bad_grad[3] = torch.empty(5, 37, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="grad must have the student's dtype"):
        torch.ops.fastkd.kd_rows(*bad_grad)
    bad_div = list(args)
    bad_div[5] = len(fastkd.DIVERGENCES)  # one past the table
    with pytest.raises(RuntimeError, match=f"unknown divergence code {bad_div[5]}"):
        torch.ops.fastkd.kd_rows(*bad_div)
    strided = list(args)
    strided[0] = torch.randn(37, 5).T
    with pytest.raises(RuntimeError, match="unit stride along V"):
        torch.ops.fastkd.kd_rows(*strided)
    overlapping = list(args)
    overlapping[3] = torch.empty(1, 37).expand(5, 37)
    with pytest.raises(RuntimeError, match="rows of grad overlap"):
        torch.ops.fastkd.kd_rows(*overlapping)
    shifted = list(args)
    both = torch.randn(6, 37)
    shifted[0], shifted[1], shifted[3] = both[:-1], both[1:], both[:-1]
    with pytest.raises(RuntimeError, match="grad overlaps the teacher"):
        torch.ops.fastkd.kd_rows(*shifted)
    shifted[3] = both[1:]
    with pytest.raises(RuntimeError, match="grad overlaps the student"):
        torch.ops.fastkd.kd_rows(*shifted)


# --- torch.compile --------------------------------------------------------------------------


@needs_cpu_kernel
def test_torch_compile_fullgraph_matches_eager():
    """A tiny student + KDLoss compiled with fullgraph=True (a graph break is an error) runs
    the C++ kernel and matches eager, loss and parameter gradients."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(3)
    V, H = 96, 16
    student = torch.nn.Sequential(torch.nn.Linear(H, 32), torch.nn.GELU(), torch.nn.Linear(32, V))
    loss_fn = fastkd.KDLoss("jsd", temperature=2.0, ce_weight=0.3, beta=0.4)
    x = torch.randn(2, 7, H, generator=gen)
    teacher_logits = make_logits((2, 7, V), torch.float32, "cpu", gen)
    labels = make_labels((2, 7), V, "some", gen, "cpu")

    def step(model):
        model.zero_grad()
        loss = loss_fn(model(x), teacher_logits, labels)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    calls = []
    real = _backends.row_kernel

    def spy(backend, topk=False):
        calls.append(backend)
        return real(backend, topk=topk)

    eager_loss, eager_grads = step(student)
    compiled = torch.compile(student, fullgraph=True)

    def compiled_step():
        compiled.zero_grad()
        loss = torch.compile(loss_fn, fullgraph=True)(compiled(x), teacher_logits, labels)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in student.parameters()]

    import unittest.mock

    with unittest.mock.patch.object(_backends, "row_kernel", spy):
        comp_loss, comp_grads = compiled_step()
    assert "cpu" in calls
    torch.testing.assert_close(comp_loss, eager_loss, rtol=1e-5, atol=0)
    for got, want in zip(comp_grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    # Both against the oracle: the float64 reference through a float64 copy of the model.
    model64 = copy.deepcopy(student).double()
    ref, _, _ = fastkd.kd_loss_reference(
        model64(x.double()), teacher_logits.double(), labels, divergence="jsd",
        temperature=2.0, ce_weight=0.3, beta=0.4,
    )  # fmt: skip
    ref.backward()
    for loss, grads in ((eager_loss, eager_grads), (comp_loss, comp_grads)):
        assert rel_err(loss, ref) <= LOSS_TOL
        for got, p64 in zip(grads, model64.parameters(), strict=True):
            assert rel_err(got, p64.grad) <= 1e-5, rel_err(got, p64.grad)


@needs_cpu_kernel
@pytest.mark.parametrize(
    "dynamic,dtype",
    [(None, torch.float32), (True, torch.float32), (None, torch.float16)],
    ids=["static", "dynamic", "float16"],  # float16: the reduction's factor in the backward
)
def test_torch_compile_model_and_loss_in_one_graph(dynamic, dtype):
    """Model and loss in one compiled function: no graph break (fullgraph=True), also with
    dynamic shapes (symbolic N and options) over batches of two sizes."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(50, 12, generator=gen).to(dtype).requires_grad_(True)

    def f(w, x, t):
        return fastkd.kd_loss(x @ w.T, t, divergence="forward_kl", temperature=2.0) * 3.0

    compiled = torch.compile(f, fullgraph=True, dynamic=dynamic)
    for n_rows in (9, 13):
        x = torch.randn(n_rows, 12, generator=gen).to(dtype)
        t = make_logits((n_rows, 50), dtype, "cpu", gen)
        (g_eager,) = torch.autograd.grad(f(w, x, t), w)
        loss = compiled(w, x, t)
        (g_comp,) = torch.autograd.grad(loss, w)
        torch.testing.assert_close(loss, f(w, x, t), rtol=1e-5, atol=0)
        torch.testing.assert_close(g_comp, g_eager, rtol=1e-4, atol=1e-7)
        # Both against the float64 reference on the same rounded logits, through the same
        # matmul: a reduction factor lost or doubled (float16 defers it to the backward)
        # is off by n_rows, whether compiled or eager.
        logits = (x @ w.T).detach()
        logits64 = logits.double().requires_grad_(True)
        ref, _, _ = fastkd.kd_loss_reference(logits64, t.double(), divergence="forward_kl",
                                             temperature=2.0)  # fmt: skip
        (ref * 3.0).backward()
        g_ref = logits64.grad.T @ x.double()
        assert rel_err(loss, ref * 3.0) <= LOSS_TOL
        # dtype's rounding of the logits' gradient and of the matmul's product (1e-2 of
        # design.md for half; float32 sums over 9-13 rows for float32).
        tol = 1e-5 if dtype == torch.float32 else GRAD_TOL[dtype]
        for g in (g_eager, g_comp):
            assert rel_err(g, g_ref) <= tol, rel_err(g, g_ref)


# --- the CPU kernel at real sizes -----------------------------------------------------------


@needs_cpu_kernel
@pytest.mark.parametrize("divergence", list(fastkd.DIVERGENCES))
def test_cpu_kernel_llama3_vocabulary(divergence):
    """V = 128256 (Llama 3) on a few rows, bf16, CE and T != 1: many online-softmax chunks."""
    gen = torch.Generator().manual_seed(11)
    shape = (3, 128256)
    s = make_logits(shape, torch.bfloat16, "cpu", gen)
    t = make_logits(shape, torch.bfloat16, "cpu", gen)
    labels = make_labels((3,), shape[1], "some", gen, "cpu")
    check_against_reference(
        s, t, labels, "cpu", gen, divergence=divergence, temperature=2.0, ce_weight=0.5
    )


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "skew_reverse_kl"])
def test_cpu_kernel_many_rows(divergence, dtype):
    """Enough rows for every thread, V = 32000 with an odd remainder of the last chunk."""
    gen = torch.Generator().manual_seed(12)
    shape = (48, 32000)
    s = make_logits(shape, dtype, "cpu", gen)
    t = make_logits(shape, dtype, "cpu", gen)
    labels = make_labels((48,), shape[1], "some", gen, "cpu")
    check_against_reference(
        s, t, labels, "cpu", gen, divergence=divergence, temperature=1.0, ce_weight=0.2
    )


@needs_cpu_kernel
def test_cpu_kernel_short_rows_many_threads():
    """Thousands of short rows: parallel_for groups rows; every row is its own problem."""
    gen = torch.Generator().manual_seed(13)
    s = make_logits((4096, 19), torch.float16, "cpu", gen)
    t = make_logits((4096, 19), torch.float16, "cpu", gen)
    check_against_reference(s, t, None, "cpu", gen, divergence="tvd", reduction="none")


@needs_cpu_kernel
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_cpu_kernel_inplace_at_size(divergence):
    """inplace_backward over bf16 rows of V = 32003, softcap on: the gradient replaces them."""
    gen = torch.Generator().manual_seed(14)
    shape = (6, 32003)
    s = make_logits(shape, torch.bfloat16, "cpu", gen)
    t = make_logits(shape, torch.bfloat16, "cpu", gen)
    opts = dict(divergence=divergence, temperature=1.5, softcap=30.0, ce_weight=0.5)
    labels = make_labels((6,), shape[1], "some", gen, "cpu")
    s64 = s.double().requires_grad_(True)
    ref, _, _ = fastkd.kd_loss_reference(s64, t.double(), labels, **opts)
    ref.backward()
    leaf = s.clone().requires_grad_(True)
    logits = leaf * 1  # a model's output (inplace_backward refuses a leaf); exact in bf16
    loss = fastkd.kd_loss(logits, t, labels, backend="cpu", inplace_backward=True, **opts)
    loss.backward()
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    assert (leaf.grad.double() - s64.grad).norm() <= 1e-2 * s64.grad.norm()
    assert torch.equal(logits.detach(), leaf.grad)  # written over the logits themselves


@needs_cpu_kernel
def test_cpu_kernel_mixed_dtypes():
    """bf16 student with a float32 teacher: each row converts on its own; grad is bf16."""
    gen = torch.Generator().manual_seed(15)
    s = make_logits((4, 3000), torch.bfloat16, "cpu", gen)
    t = make_logits((4, 3000), torch.float32, "cpu", gen)
    check_against_reference(s, t, None, "cpu", gen, divergence="reverse_kl", temperature=2.0)


@needs_cpu_kernel
def test_avx2_module_matches_the_reference():
    """The AVX2 build, on a machine that runs it (ATEN_CPU_CAPABILITY picks it), held to what
    the matrix holds the AVX-512 one to: float32 at 1e-5 (loss and gradient), bf16 and fp16
    gradients entry by entry within kd_testing.HALF_ULPS ulps; every divergence, with labels
    and ignored rows (ignore_index -1 and -100), CE, softcap, T = 0.5 and 2.5, every
    reduction, and V = 37 and 2053, neither a multiple of its 8-float vector (the tail of a
    vector; 2053 also spans two 2048-entry chunks)."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512" or (
        "avx2" not in fastkd.build_info()["cpu_kernels"]
    ):
        pytest.skip("needs an AVX-512 machine with the avx2 module built beside the avx512 one")
    code = f"""
        import sys
        sys.path.insert(0, {str(ROOT / "tests")!r})
        import zlib
        import torch, fastkd
        from kd_testing import WORST_ERRORS, check_against_reference, make_labels, make_logits
        assert fastkd.build_info()["cpu_kernel"] == "avx2", fastkd.build_info()
        configs = [
            dict(shape=(6, 37), temperature=0.5, softcap=20.0, ce_weight=0.4, ignore_index=-1,
                 reduction="mean", kd_weight=0.7),
            dict(shape=(2, 2, 2053), temperature=2.5, softcap=None, ce_weight=0.3,
                 ignore_index=-100, reduction="none", scale_by_temperature_squared=False),
            dict(shape=(3, 37), temperature=0.5, softcap=None, ce_weight=1.0,
                 ignore_index=-100, reduction="batchmean", beta=0.2, alpha=0.7),
            dict(shape=(5, 37), temperature=2.5, softcap=5.0, ce_weight=0.0,
                 ignore_index=-1, reduction="sum"),
        ]
        for divergence in fastkd.DIVERGENCES:
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                for i, config in enumerate(configs):
                    config = dict(config)
                    shape = config.pop("shape")
                    key = repr((divergence, str(dtype), i)).encode()
                    gen = torch.Generator().manual_seed(zlib.crc32(key))
                    s = make_logits(shape, dtype, "cpu", gen)
                    t = make_logits(shape, dtype, "cpu", gen)
                    labels = make_labels(shape[:-1], shape[-1], "some", gen, "cpu",
                                         ignore_index=config["ignore_index"])
                    try:
                        check_against_reference(s, t, labels, "cpu", gen,
                                                divergence=divergence, **config)
                    except AssertionError as error:
                        raise AssertionError(f"{{divergence}} {{dtype}} {{config}}: {{error}}")
        for key, (loss_err, grad_err) in sorted(WORST_ERRORS.items()):
            print(key, f"loss {{loss_err:.1e}} grad {{grad_err:.1e}}")
        print("ok")
    """
    done = _run_python(code, ATEN_CPU_CAPABILITY="avx2")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "ok", done.stdout
    print(done.stdout)


@needs_cpu_kernel
@pytest.mark.parametrize("divergence", list(fastkd.DIVERGENCES))
def test_cpu_kernel_propagates_nan(divergence):
    """A NaN logit makes its row's gradient NaN, and its loss NaN at least where the
    reference's is (GradScaler and anomaly checks rely on it); other rows are untouched."""
    gen = torch.Generator().manual_seed(17)
    s = make_logits((3, 4100), torch.float32, "cpu", gen)
    t = make_logits((3, 4100), torch.float32, "cpu", gen)
    s[1, 2345] = float("nan")
    leaf = s.clone().requires_grad_(True)
    out = fastkd.kd_loss(leaf, t, divergence=divergence, reduction="none", backend="cpu")
    out.sum().backward()
    ref_nan, _, _ = fastkd.kd_loss_reference(
        s[1:2].double(), t[1:2].double(), divergence=divergence, reduction="none"
    )
    if torch.isnan(ref_nan[0]):  # the reference's 0 log 0 guards hide some NaNs; ours may not
        assert torch.isnan(out[1])
    assert torch.isnan(leaf.grad[1]).all()
    ok = torch.tensor([0, 2])
    ref, _, _ = fastkd.kd_loss_reference(
        s[ok].double(), t[ok].double(), divergence=divergence, reduction="none"
    )
    torch.testing.assert_close(out[ok].double(), ref, rtol=1e-5, atol=0)
