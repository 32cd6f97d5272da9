"""fastkd.topk_producer (design.md §4 "Producer"): top-k log-probabilities exact over the
whole vocabulary, from logits and, chunk by chunk, from hidden states and an LM head.

The oracle is float64 ``log_softmax(softcap * tanh(x / softcap) / T)`` over the whole row:
the values must be its k largest (within float32 rounding), the ids must be distinct and
carry those values (which allows any order among ties)."""

import zlib

import pytest
import torch
import torch.nn.functional as F

from fastkd.topk import TopKTeacher
from fastkd.topk_producer import topk_logprobs, topk_logprobs_from_hidden

V = 97


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def oracle_logprobs(logits: torch.Tensor, temperature=1.0, softcap=None) -> torch.Tensor:
    """The teacher's full log-probabilities in float64, from the logits as given."""
    a = logits.to(torch.float64)
    if softcap is not None:
        a = softcap * torch.tanh(a / softcap)
    return F.log_softmax(a / temperature, dim=-1)


def assert_topk_of(teacher: TopKTeacher, full: torch.Tensor, k: int, atol: float) -> None:
    """teacher holds a top-k of the float64 log-probabilities ``full`` (..., V)."""
    assert isinstance(teacher, TopKTeacher)
    assert teacher.token_ids.dtype == torch.int64
    assert teacher.token_ids.shape == (*full.shape[:-1], k)
    assert teacher.mask is None
    assert not teacher.logprobs.requires_grad
    ids, lp = teacher.token_ids.cpu(), teacher.logprobs.cpu().double()
    ref_values = full.topk(k, dim=-1).values
    # the values are the k largest, in order
    torch.testing.assert_close(lp, ref_values, atol=atol, rtol=0)
    # each id carries its value (any order among ties), ids distinct within a row
    torch.testing.assert_close(full.gather(-1, ids), lp, atol=atol, rtol=0)
    sorted_ids = ids.reshape(-1, k).sort(-1).values
    assert bool((sorted_ids[:, 1:] != sorted_ids[:, :-1]).all()), "repeated id in a row"
    assert bool((lp[..., 1:] <= lp[..., :-1]).all()), "not sorted by decreasing logprob"


def _tol(full: torch.Tensor, dtype: torch.dtype) -> float:
    """float32 rounding of the scaled logits and their logsumexp (a few ulps of the row's
    largest magnitude), or float64's."""
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    return 16 * eps * max(1.0, float(full.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(("temperature", "softcap"), [(1.0, None), (2.5, None), (0.5, 4.0)])
@pytest.mark.parametrize("k", [1, 10, V])
def test_topk_logprobs_matches_full_log_softmax(dtype, temperature, softcap, k):
    gen = _gen("topk", dtype, temperature, softcap, k)
    logits = (torch.randn(3, 7, V, generator=gen, dtype=torch.float64) * 4).to(dtype)
    teacher = topk_logprobs(logits, k, temperature=temperature, softcap=softcap)
    full = oracle_logprobs(logits, temperature, softcap)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    assert teacher.logprobs.dtype == wide
    assert_topk_of(teacher, full, k, _tol(full, dtype))
    if dtype == torch.float64:
        # the same float64 operations as the oracle's: the same ids, ties included
        assert torch.equal(teacher.token_ids, full.topk(k, dim=-1).indices)


def test_topk_logprobs_shapes_and_large_logits():
    gen = _gen("shapes")
    one = torch.randn(V, generator=gen)
    t = topk_logprobs(one, 3)
    assert t.token_ids.shape == (3,)
    assert_topk_of(t, oracle_logprobs(one), 3, 1e-5)
    empty = topk_logprobs(torch.empty(0, 5, V), 4)
    assert empty.token_ids.shape == (0, 5, 4) and empty.logprobs.shape == (0, 5, 4)
    # logits far from 0: the logsumexp is taken stably
    big = torch.randn(4, V, generator=gen) * 50 + 3e3
    t = topk_logprobs(big, 5, temperature=0.7)
    full = oracle_logprobs(big, 0.7)
    assert_topk_of(t, full, 5, _tol(full, torch.float32))
    assert torch.isfinite(t.logprobs).all()


def test_topk_logprobs_leaves_logits_alone_and_builds_no_graph():
    gen = _gen("alone")
    logits = torch.randn(5, V, generator=gen).requires_grad_(True)
    before = logits.detach().clone()
    t = topk_logprobs(logits, 6, temperature=2.0, softcap=3.0)
    assert torch.equal(logits.detach(), before)
    assert not t.logprobs.requires_grad and t.logprobs.grad_fn is None
    # no transform at all: the chunk is the input itself, and still untouched
    t = topk_logprobs(logits, 6)
    assert torch.equal(logits.detach(), before)


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_topk_logprobs_chunked_equals_whole(softcap):
    gen = _gen("chunks", softcap)
    logits = torch.randn(4, 11, V, generator=gen) * 3
    whole = topk_logprobs(logits, 8, temperature=1.3, softcap=softcap, chunk_size=10**6)
    for options in ({"chunk_size": 1}, {"chunk_size": 5}, {"chunk_size": 64},
                    {"memory_budget": 1}, {"memory_budget": 7 * V * 16}, {}):  # fmt: skip
        part = topk_logprobs(logits, 8, temperature=1.3, softcap=softcap, **options)
        torch.testing.assert_close(part.logprobs, whole.logprobs, atol=1e-6, rtol=0)
        assert torch.equal(part.token_ids, whole.token_ids), options


def _head(gen, lead, h, dtype, bias=True, v=V):
    hidden = torch.randn(*lead, h, generator=gen, dtype=torch.float64) * 2
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) / h**0.5
    b = torch.randn(v, generator=gen, dtype=torch.float64) if bias else None
    return [None if x is None else x.to(dtype) for x in (hidden, weight, b)]


def _full_from_head(hidden, weight, bias, temperature=1.0, softcap=None):
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    return oracle_logprobs(logits, temperature, softcap)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_from_hidden_matches_full_log_softmax(dtype, bias):
    gen = _gen("hidden", dtype, bias)
    hidden, weight, b = _head(gen, (2, 9), 16, dtype, bias)
    full = _full_from_head(hidden, weight, b, 1.7, 6.0)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    # float32 accumulation over H = 16 products: a few ulps of the logits more
    atol = 4 * _tol(full, dtype)
    results = []
    chunking = [{}, {"chunk_size": 1}, {"chunk_size": 4}, {"chunk_size": 7}, {"memory_budget": 1},
                {"chunk_size": 64, "memory_budget": 3 * V * 16}]  # fmt: skip
    for options in chunking:
        t = topk_logprobs_from_hidden(
            hidden, weight, 12, b, temperature=1.7, softcap=6.0, **options
        )
        assert t.logprobs.dtype == wide
        assert t.token_ids.shape == (2, 9, 12)
        assert_topk_of(t, full, 12, atol)
        results.append(t)
    for t in results[1:]:  # chunked against unchunked
        torch.testing.assert_close(t.logprobs, results[0].logprobs, atol=atol, rtol=0)


def test_from_hidden_never_holds_more_than_a_chunk(monkeypatch):
    from fastkd import _linear_heads

    seen = []
    logits = _linear_heads.Head.logits

    def spy(self, h):
        out = logits(self, h)
        seen.append(tuple(out.shape))
        return out

    monkeypatch.setattr(_linear_heads.Head, "logits", spy)
    gen = _gen("spy")
    hidden, weight, b = _head(gen, (3, 6), 8, torch.bfloat16)
    topk_logprobs_from_hidden(hidden, weight, 4, b, chunk_size=4)
    assert seen == [(4, V)] * 4 + [(2, V)]
    seen.clear()
    # a budget of 5 rows' working set (4 float32 per logit) gives chunks of 5 rows
    topk_logprobs_from_hidden(hidden, weight, 4, b, memory_budget=5 * 4 * 4 * V)
    assert seen == [(5, V)] * 3 + [(3, V)]


def test_from_hidden_equals_topk_of_its_logits():
    gen = _gen("same")
    hidden, weight, b = _head(gen, (3, 5), 8, torch.float32)
    a = topk_logprobs_from_hidden(hidden, weight, 7, b, chunk_size=4)
    logits = torch.addmm(b, hidden.reshape(-1, 8), weight.T).reshape(3, 5, V)
    c = topk_logprobs(logits, 7)
    torch.testing.assert_close(a.logprobs, c.logprobs, atol=1e-5, rtol=0)
    assert_topk_of(a, _full_from_head(hidden, weight, b), 7, 1e-5)


def test_from_hidden_under_autocast_casts_like_linear():
    gen = _gen("autocast")
    hidden, weight, b = _head(gen, (6,), 16, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        t = topk_logprobs_from_hidden(hidden, weight, 5, b)
    low = topk_logprobs_from_hidden(*(x.bfloat16() for x in (hidden, weight)), 5, b.bfloat16())
    torch.testing.assert_close(t.logprobs, low.logprobs, atol=0, rtol=0)
    assert torch.equal(t.token_ids, low.token_ids)
    assert not t.logprobs.requires_grad


def test_from_hidden_needs_no_grad_and_keeps_inputs():
    gen = _gen("grad")
    hidden, weight, b = _head(gen, (4,), 8, torch.float32)
    leaves = [x.clone().requires_grad_(True) for x in (hidden, weight, b)]
    t = topk_logprobs_from_hidden(leaves[0], leaves[1], 3, leaves[2])
    assert t.logprobs.grad_fn is None
    for x, y in zip(leaves, (hidden, weight, b), strict=True):
        assert torch.equal(x.detach(), y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_full_log_softmax(dtype):
    gen = _gen("cuda", dtype)
    hidden, weight, b = _head(gen, (3, 50), 64, dtype, v=1000)
    full = _full_from_head(hidden, weight, b, 1.5)
    t = topk_logprobs_from_hidden(
        hidden.cuda(), weight.cuda(), 64, b.cuda(), temperature=1.5, chunk_size=32
    )
    assert t.token_ids.is_cuda and t.logprobs.is_cuda
    assert_topk_of(t, full, 64, 4 * _tol(full, dtype))
    logits = (hidden.double() @ weight.double().T + b.double()).to(dtype)
    t = topk_logprobs(logits.cuda(), 64, temperature=1.5, softcap=5.0, chunk_size=64)
    full = oracle_logprobs(logits, 1.5, 5.0)
    assert_topk_of(t, full, 64, _tol(full, dtype))


# --- bad arguments -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"k": 0}, ValueError, r"k must lie in \[1, V\] with V = 97"),
        ({"k": V + 1}, ValueError, r"k must lie in \[1, V\] with V = 97"),
        ({"k": 2.0}, TypeError, "k must be an int"),
        ({"k": True}, TypeError, "k must be an int"),
        ({"temperature": 0.0}, ValueError, "temperature must be"),
        ({"temperature": -1.0}, ValueError, "temperature must be"),
        ({"temperature": float("nan")}, ValueError, "temperature must be"),
        ({"temperature": 1e5}, ValueError, "temperature must lie in"),
        ({"temperature": "1"}, TypeError, "temperature must be a real number"),
        ({"softcap": 0.0}, ValueError, "softcap must be"),
        ({"softcap": -2.0}, ValueError, "softcap must be"),
        ({"chunk_size": 0}, ValueError, "chunk_size must be >= 1"),
        ({"chunk_size": 1.5}, TypeError, "chunk_size must be an int"),
        ({"memory_budget": -1}, ValueError, "memory_budget must be >= 1"),
    ],
)
def test_bad_options_are_named(kwargs, error, match):
    logits = torch.randn(2, V)
    hidden, weight = torch.randn(2, 4), torch.randn(V, 4)
    args = {"k": 3, **kwargs}
    k = args.pop("k")
    with pytest.raises(error, match=match):
        topk_logprobs(logits, k, **args)
    with pytest.raises(error, match=match):
        topk_logprobs_from_hidden(hidden, weight, k, **args)


def test_bad_tensors_are_named():
    with pytest.raises(TypeError, match="logits must be a floating-point tensor"):
        topk_logprobs(torch.ones(2, V, dtype=torch.int64), 3)
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        topk_logprobs([[0.0, 1.0]], 1)
    with pytest.raises(ValueError, match="logits must have a vocabulary dimension"):
        topk_logprobs(torch.tensor(1.0), 1)
    with pytest.raises(ValueError, match="vocabulary is empty"):
        topk_logprobs(torch.empty(3, 0), 1)
    h, w, b = torch.randn(2, 4), torch.randn(V, 4), torch.randn(V)
    with pytest.raises(ValueError, match="weight has hidden size 5"):
        topk_logprobs_from_hidden(h, torch.randn(V, 5), 3)
    with pytest.raises(ValueError, match=r"weight must be \(V, H\)"):
        topk_logprobs_from_hidden(h, torch.randn(4), 3)
    with pytest.raises(ValueError, match=r"bias must have shape \(97,\)"):
        topk_logprobs_from_hidden(h, w, 3, torch.randn(V + 1))
    with pytest.raises(TypeError, match="weight has dtype torch.bfloat16 but hidden has"):
        topk_logprobs_from_hidden(h, w.bfloat16(), 3)
    with pytest.raises(TypeError, match="bias has dtype torch.float64"):
        topk_logprobs_from_hidden(h, w, 3, b.double())
    with pytest.raises(TypeError, match="hidden must be a floating-point tensor"):
        topk_logprobs_from_hidden(h.long(), w, 3)
    with pytest.raises(ValueError, match="hidden must have a hidden dimension"):
        topk_logprobs_from_hidden(torch.tensor(1.0), w, 3)
    with pytest.raises(ValueError, match=r"k must lie in \[1, V\] with V = 97 \(weight's dim 0\)"):
        topk_logprobs_from_hidden(h, w, 98)
    with pytest.raises(TypeError, match="dense"):
        topk_logprobs(torch.randn(2, V).to_sparse(), 3)
