"""Every bad input gets a clear error naming the argument, before any kernel runs."""

import pytest
import torch

import fastkd
from fastkd import _backends


@pytest.fixture(autouse=True)
def no_kernel(monkeypatch):
    """Any kernel launch during these tests is a failure: checks come first."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a kernel ran before the arguments were checked")

    monkeypatch.setattr(_backends, "row_kernel", forbidden)
    monkeypatch.setattr(fastkd.losses, "reference_loss", forbidden)


def _inputs(shape=(4, 10)):
    return torch.randn(shape) * 3, torch.randn(shape) * 3


def _raises(error, match, *args, **kwargs):
    with pytest.raises(error, match=match):
        fastkd.kd_loss(*args, **kwargs)


def test_mismatched_vocabulary():
    s, _ = _inputs((4, 10))
    match = "10 columns and teacher_logits 11: pass vocab_size=10"
    _raises(ValueError, match, s, torch.randn(4, 11))


def test_mismatched_leading_shape():
    s, _ = _inputs((4, 10))
    _raises(ValueError, "leading shape", s, torch.randn(2, 2, 10))


@pytest.mark.parametrize("which", ["student_logits", "teacher_logits"])
def test_non_floating_logits(which):
    s, t = _inputs()
    ints = torch.randint(0, 5, (4, 10))
    args = (ints, t) if which == "student_logits" else (s, ints)
    _raises(TypeError, f"{which} must be a floating-point tensor", *args)


def test_not_a_tensor():
    _, t = _inputs()
    _raises(TypeError, "student_logits must be a torch.Tensor", [[1.0, 2.0]], t)


def test_zero_dim_and_empty_vocabulary():
    _raises(
        ValueError, "student_logits must have a vocabulary", torch.tensor(1.0), torch.tensor(1.0)
    )
    _raises(ValueError, "empty vocabulary", torch.randn(3, 0), torch.randn(3, 0))


def test_labels_wrong_shape():
    s, t = _inputs()
    _raises(ValueError, "labels must have the leading shape", s, t, torch.zeros(5).long() + 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_labels_wrong_dtype(dtype):
    s, t = _inputs()
    _raises(TypeError, "labels must be an integer tensor", s, t, torch.ones(4, dtype=dtype))


def test_labels_out_of_range():
    s, t = _inputs()
    _raises(ValueError, r"labels must lie in \[0, 10\)", s, t, torch.tensor([0, 3, 10, -100]))
    _raises(ValueError, "ignore_index=-100", s, t, torch.tensor([0, -1, 2, 3]))


def test_ce_weight_needs_labels():
    s, t = _inputs()
    _raises(ValueError, "needs labels", s, t, ce_weight=0.5)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature(temperature):
    s, t = _inputs()
    _raises(ValueError, "temperature must be a finite number > 0", s, t, temperature=temperature)
    with pytest.raises(ValueError, match="temperature"):
        fastkd.KDLoss(temperature=temperature)


def test_temperature_not_a_number():
    s, t = _inputs()
    _raises(TypeError, "temperature must be a real number", s, t, temperature="2")


@pytest.mark.parametrize("beta", [0.0, 1.0, -0.2, 1.5])
def test_bad_beta(beta):
    s, t = _inputs()
    _raises(ValueError, "beta must lie strictly between 0 and 1", s, t, divergence="jsd", beta=beta)


@pytest.mark.parametrize("divergence", ["skew_forward_kl", "skew_reverse_kl"])
@pytest.mark.parametrize("alpha", [0.0, 1.0, 2.0])
def test_bad_alpha(divergence, alpha):
    s, t = _inputs()
    _raises(
        ValueError,
        "alpha must lie strictly between 0 and 1",
        s,
        t,
        divergence=divergence,
        alpha=alpha,
    )


def test_unknown_divergence_and_reduction_and_backend():
    s, t = _inputs()
    _raises(ValueError, "divergence must be one of", s, t, divergence="kl")
    _raises(ValueError, "reduction must be one of", s, t, reduction="avg")
    _raises(ValueError, "backend must be one of", s, t, backend="fast")
    with pytest.raises(ValueError, match="divergence must be one of"):
        fastkd.KDLoss("kl")


def test_bad_softcap_and_weights():
    s, t = _inputs()
    _raises(ValueError, "softcap must be a finite number > 0", s, t, softcap=0.0)
    _raises(ValueError, "ce_weight must be a finite number", s, t, ce_weight=float("nan"))
    _raises(TypeError, "kd_weight must be a real number", s, t, kd_weight=None)
    _raises(TypeError, "ignore_index must be an int", s, t, ignore_index=1.5)


def test_bad_num_items_in_batch():
    s, t = _inputs()
    _raises(ValueError, "num_items_in_batch must be > 0", s, t, num_items_in_batch=0)
    _raises(
        ValueError,
        "num_items_in_batch must hold one number",
        s,
        t,
        num_items_in_batch=torch.tensor([1, 2]),
    )
    for bad in (torch.tensor(-5), torch.tensor(float("nan")), torch.tensor(float("inf"))):
        _raises(ValueError, "num_items_in_batch must be a finite number >= 0", s, t,
                num_items_in_batch=bad)  # fmt: skip
    _raises(TypeError, "num_items_in_batch must hold a real number", s, t,
            num_items_in_batch=torch.tensor(True))  # fmt: skip


@pytest.mark.parametrize("flag", ["scale_by_temperature_squared", "inplace_backward",
                                  "return_components"])  # fmt: skip
def test_flags_must_be_bools(flag):
    s, t = _inputs()
    _raises(TypeError, f"{flag} must be True or False", s, t, **{flag: "no"})
    _raises(TypeError, f"{flag} must be True or False", s, t, **{flag: None})
    if flag != "return_components":
        with pytest.raises(TypeError, match=f"{flag} must be True or False"):
            fastkd.KDLoss(**{flag: 1})


def test_different_devices():
    s, t = _inputs()
    if not torch.cuda.is_available():
        pytest.skip("needs a second device (a GPU): meta tensors are refused as data-less")
    _raises(ValueError, "one device", s, t.cuda())
    _raises(
        ValueError,
        "labels must be on the logits' device",
        s,
        t,
        torch.zeros(4, dtype=torch.long, device="cuda"),
    )


def test_unavailable_backend():
    # A device Triton cannot run on without a GPU: the registry's check (the public call
    # refuses meta tensors before that, as tensors without data).
    with pytest.raises(ValueError, match="backend='triton' is not available"):
        _backends.resolve("triton", torch.device("meta"), torch.float32)


def test_float64_on_a_kernel_backend():
    s, t = _inputs()
    if not _backends.is_available("triton", s.device)[0]:
        pytest.skip("triton cannot run on CPU tensors here (TRITON_INTERPRET unset)")
    _raises(ValueError, "use backend='torch' for float64", s.double(), t.double(), backend="triton")


def test_inplace_backward_needs_viewable_rows():
    s, t = _inputs((10, 4))
    s = s.T.requires_grad_(True)  # (4, 10), stride(-1) == 4
    if not _backends.is_available("triton", s.device)[0]:
        pytest.skip("triton cannot run on CPU tensors here (TRITON_INTERPRET unset)")
    _raises(
        ValueError,
        "inplace_backward=True",
        s,
        t.T.contiguous(),
        inplace_backward=True,
        backend="triton",
    )


def _kernel_backend(device):
    for name in ("cpu", "triton"):
        if _backends.is_available(name, device)[0]:
            return name
    pytest.skip("no kernel backend for CPU tensors here (no fastkd._C, TRITON_INTERPRET unset)")


def test_inplace_backward_rejects_overlapping_rows():
    row = (torch.randn(1, 10) * 3).requires_grad_(True) * 1.0  # a model's output
    s = row.expand(4, 10)  # four rows, one row of memory
    backend = _kernel_backend(s.device)
    _raises(
        ValueError, "rows overlap", s, torch.randn(4, 10), inplace_backward=True, backend=backend
    )


def test_inplace_backward_rejects_a_teacher_it_would_overwrite():
    x = (torch.randn(5, 10) * 3).requires_grad_(True) * 1.0
    backend = _kernel_backend(x.device)
    # The causal shift of one tensor: row i of the teacher is row i + 1 of the student.
    _raises(
        ValueError,
        "overwrite teacher_logits",
        x[:-1],
        x[1:].detach(),
        inplace_backward=True,
        backend=backend,
    )
