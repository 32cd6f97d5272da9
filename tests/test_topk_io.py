"""fastkd.topk_io: the peers' top-k formats to TopKTeacher, and the safetensors cache.

Each converter is checked by a round trip: the format is built here, independently, from a
random TopKTeacher (ragged padding, distinct ids, rows sorted by decreasing logprob), and
converted back. The cache is checked against safetensors' own reader and writer, for exact
ids and logprobs within the 16-bit formats' rounding: float16 keeps 11 significant bits, so
|stored - l| <= 2**-11 |l| (2**-25 for |l| < 2**-14), bfloat16 8 bits: 2**-8 |l|."""

import ast
import json
import math
import os
import pickle
import sys
import zlib
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fastkd.topk import TopKTeacher
from fastkd.topk_io import (
    TopKReader,
    TopKShardWriter,
    from_axolotl,
    from_openai_chat,
    from_trl,
    from_vllm_logprobs,
    load_topk,
    save_topk,
)
from fastkd.topk_producer import topk_logprobs

try:
    from safetensors import safe_open
    from safetensors.torch import save_file
except ImportError:  # the converters are tested all the same
    safe_open = save_file = None
needs_safetensors = pytest.mark.skipif(
    save_file is None, reason="safetensors is not installed (pip install 'fastkd[topk]')"
)

V = 53


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def random_teacher(gen, lead, k, v=V, *, low_id=0, full_rows=False) -> TopKTeacher:
    """Distinct ids per row, logprobs of a random distribution over v, sorted decreasing;
    each row keeps a random number (0..k) of real entries first, then padding (mask False,
    with junk behind it: ids and logprobs the formats must not trust)."""
    rows = math.prod(lead)
    logits = torch.randn(rows, v, generator=gen) * 3
    logits[:, :low_id] = -torch.inf  # ids below low_id never chosen
    full = torch.log_softmax(logits, -1)
    lp, ids = full.topk(k, -1)
    counts = (
        torch.full((rows,), k) if full_rows else torch.randint(0, k + 1, (rows,), generator=gen)
    )
    mask = torch.arange(k)[None, :] < counts[:, None]
    ids = torch.where(mask, ids, torch.randint(0, v, ids.shape, generator=gen))
    lp = torch.where(mask, lp, torch.randn(lp.shape, generator=gen))
    return TopKTeacher(ids.reshape(*lead, k), lp.reshape(*lead, k), mask.reshape(*lead, k))


def assert_same_teacher(got: TopKTeacher, want: TopKTeacher, atol=0.0, rtol=0.0) -> None:
    """Same real entries (ids exact, logprobs within tolerance), padding as (0, -inf)."""
    assert got.token_ids.shape == want.token_ids.shape
    real = want.valid()
    assert torch.equal(got.valid().cpu(), real.cpu())
    ids, lp = got.token_ids.cpu().long(), got.logprobs.cpu().double()
    assert torch.equal(ids[real], want.token_ids.cpu().long()[real])
    torch.testing.assert_close(lp[real], want.logprobs.cpu().double()[real], atol=atol, rtol=rtol)
    assert bool((ids[~real] == 0).all()), "padding ids must be 0"
    assert bool((lp[~real] == -math.inf).all()), "padding logprobs must be -inf"


# --- axolotl -------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_kind", ["int", "bool", "list", "mapping"])
def test_from_axolotl_round_trip(mask_kind):
    teacher = random_teacher(_gen("axolotl", mask_kind), (2, 5), 7)
    m = teacher.mask
    ids = torch.where(m, teacher.token_ids, 0)  # axolotl pads ids with 0
    lp = torch.where(m, teacher.logprobs, float("nan"))  # junk behind the mask
    if mask_kind == "int":
        got = from_axolotl(ids, lp, m.long())
    elif mask_kind == "bool":
        got = from_axolotl(ids, lp, m)
    elif mask_kind == "list":
        got = from_axolotl(ids.tolist(), torch.where(m, lp, 0.0).tolist(), m.int().tolist())
    else:
        got = from_axolotl({"target_token_ids": ids, "target_logprobs": lp, "target_mask": m})
    assert got.mask is not None and got.token_ids.dtype == torch.int64
    assert_same_teacher(got, teacher)


def test_from_axolotl_errors():
    ids, lp, m = torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(TypeError, match="target_mask must be a bool or integer"):
        from_axolotl(ids, lp, m)
    with pytest.raises(ValueError, match="target_token_ids and target_logprobs must have one"):
        from_axolotl(ids, lp[:, :2], m.bool())
    with pytest.raises(ValueError, match="target_token_ids and target_mask"):
        from_axolotl(ids, lp, m.bool()[:1])
    with pytest.raises(TypeError, match="target_token_ids must hold integers"):
        from_axolotl(lp, lp)
    with pytest.raises(ValueError, match="target_logprobs holds NaN on an unmasked entry"):
        from_axolotl(ids, torch.full((2, 3), float("nan")), m.long())
    with pytest.raises(ValueError, match=r"target_token_ids must be in \[0, vocab_size=5\)"):
        from_axolotl(ids + 5, lp, m.long(), vocab_size=5)
    with pytest.raises(KeyError, match="target_logprobs"):
        from_axolotl({"target_token_ids": ids})
    with pytest.raises(TypeError, match="nested"):
        from_axolotl([[1, 2], [3]], [[0.0, 0.0], [0.0]])


# --- TRL -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tensor", "list", "mapping"])
def test_from_trl_round_trip(kind):
    teacher = random_teacher(_gen("trl", kind), (3, 4), 6)
    m = teacher.mask
    ids = torch.where(m, teacher.token_ids, 0)
    lp = torch.where(m, teacher.logprobs, -math.inf)
    if kind == "tensor":
        got = from_trl(ids, lp)
    elif kind == "list":
        got = from_trl(ids.tolist(), lp.tolist())
    else:
        got = from_trl({"topk_token_ids": ids, "topk_logprobs": lp, "actual_logprobs": lp[..., 0]})
    assert got.mask is None
    assert_same_teacher(got, teacher)


def test_from_trl_errors():
    ids, lp = torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="topk_token_ids must be non-negative"):
        from_trl(ids - 1, lp)
    # a negative id behind -inf padding is fine, and becomes 0
    got = from_trl(ids - 1, torch.full((2, 3), -math.inf))
    assert bool((got.token_ids == 0).all())
    with pytest.raises(ValueError, match=r"topk_logprobs holds \+inf"):
        from_trl(ids, torch.full((2, 3), math.inf))
    with pytest.raises(TypeError, match="from_trl\\(\\) needs topk_logprobs"):
        from_trl(ids)


# --- vLLM ----------------------------------------------------------------------------------


class FakeLogprob:
    """vLLM's Logprob: only the attributes matter."""

    def __init__(self, logprob, rank, decoded_token):
        self.logprob, self.rank, self.decoded_token = logprob, rank, decoded_token


class FlatPositions(Sequence):
    """A sequence of per-position dicts that is not a list (vLLM's FlatLogprobs)."""

    def __init__(self, dicts):
        self._dicts = dicts

    def __len__(self):
        return len(self._dicts)

    def __getitem__(self, i):
        return self._dicts[i]


def _vllm_positions(teacher: TopKTeacher, gen, *, style="objects", extra=False):
    """One entry per row: None for a row without real entries, else {id: Logprob} in a
    shuffled order; ``extra`` adds a less probable 'sampled' token to every row."""
    out = []
    ids, lp, real = teacher.token_ids.reshape(-1, teacher.k), teacher.logprobs, teacher.valid()
    lp, real = lp.reshape(-1, teacher.k), real.reshape(-1, teacher.k)
    for r in range(ids.shape[0]):
        entries = [(int(ids[r, j]), float(lp[r, j])) for j in range(teacher.k) if real[r, j]]
        if not entries and not extra:
            out.append(None)
            continue
        if extra:
            used = {e[0] for e in entries}
            free = next(i for i in range(V) if i not in used)
            entries.append((free, -60.0 - r))
        order = torch.randperm(len(entries), generator=gen).tolist()
        entries = [entries[i] for i in order]
        if style == "objects":
            out.append({t: FakeLogprob(v, j + 1, f"<{t}>") for j, (t, v) in enumerate(entries)})
        elif style == "json":
            out.append({str(t): {"logprob": v, "rank": j + 1} for j, (t, v) in enumerate(entries)})
        else:
            out.append({t: v for t, v in entries})
    return out


@pytest.mark.parametrize("style", ["objects", "json", "floats"])
def test_from_vllm_logprobs_round_trip(style):
    gen = _gen("vllm", style)
    teacher = random_teacher(gen, (9,), 8)
    positions = _vllm_positions(teacher, gen, style=style)
    positions[0] = None  # prompt_logprobs' first position
    teacher.mask[0] = False
    got = from_vllm_logprobs(positions)
    width = max(int(teacher.valid().sum(-1).max()), 1)
    want = TopKTeacher(teacher.token_ids[:, :width], teacher.logprobs[:, :width],
                       teacher.mask[:, :width])  # fmt: skip
    assert got.token_ids.shape == (9, width) and got.mask is not None
    assert_same_teacher(got, want)
    got = from_vllm_logprobs(FlatPositions(positions), k=8)
    assert_same_teacher(got, teacher)


def test_from_vllm_logprobs_k_drops_the_extra_sampled_token():
    gen = _gen("vllm-k")
    teacher = random_teacher(gen, (6,), 5, full_rows=True)
    positions = _vllm_positions(teacher, gen, extra=True)
    assert all(len(p) == 6 for p in positions)
    assert_same_teacher(from_vllm_logprobs(positions, k=5), teacher)
    wide = from_vllm_logprobs(positions)
    assert wide.k == 6 and bool(wide.valid().all())
    assert_same_teacher(
        TopKTeacher(wide.token_ids[:, :5], wide.logprobs[:, :5], wide.mask[:, :5]), teacher
    )


def test_from_vllm_logprobs_edges_and_errors():
    got = from_vllm_logprobs([None, None])
    assert got.token_ids.shape == (2, 1) and not bool(got.valid().any())
    assert from_vllm_logprobs([]).token_ids.shape == (0, 1)
    got = from_vllm_logprobs([{3: FakeLogprob(-0.1, 1, "a")}], k=4)
    assert got.token_ids.tolist() == [[3, 0, 0, 0]] and got.mask.tolist() == [[1, 0, 0, 0]]
    with pytest.raises(TypeError, match="one entry per position"):
        from_vllm_logprobs({0: {}})
    with pytest.raises(TypeError, match=r"logprobs\[1\] must be None or a"):
        from_vllm_logprobs([None, [1, 2]])
    with pytest.raises(ValueError, match="not a token id"):
        from_vllm_logprobs([{"a": -1.0}])
    with pytest.raises(ValueError, match="holds token id 7 twice"):
        from_vllm_logprobs([{7: -1.0, "7": -2.0}])
    with pytest.raises(ValueError, match="is not <= 0"):
        from_vllm_logprobs([{7: float("nan")}])
    with pytest.raises(TypeError, match="a logprob must be a number"):
        from_vllm_logprobs([{7: "x"}])
    with pytest.raises(ValueError, match=r"outside \[0, vocab_size=5\)"):
        from_vllm_logprobs([{7: -1.0}], vocab_size=5)
    with pytest.raises(ValueError, match="k must be >= 1"):
        from_vllm_logprobs([], k=0)


# --- OpenAI chat completions ---------------------------------------------------------------


class FakeTokenizer:
    """Hugging Face's convert_tokens_to_ids: vocabulary strings to ids, unk for the rest."""

    unk_token, unk_token_id = "<unk>", 0

    def __init__(self, v=V):
        self.vocab = {f"t{i}": i for i in range(1, v)} | {"<unk>": 0}

    def convert_tokens_to_ids(self, token):
        return self.vocab.get(token, self.unk_token_id)


def _chat_response(teacher: TopKTeacher, *, objects=False, token=lambda i: f"t{i}"):
    """A chat-completions response with one position per row of ``teacher`` (2-D)."""
    content = []
    for r in range(teacher.token_ids.shape[0]):
        real = teacher.valid()[r]
        top = [
            {"token": token(int(t)), "logprob": float(v), "bytes": list(token(int(t)).encode())}
            for t, v, ok in zip(teacher.token_ids[r], teacher.logprobs[r], real, strict=True)
            if ok
        ]
        sampled = top[0] if top else {"token": "t1", "logprob": -9.0, "bytes": [116, 49]}
        content.append({**sampled, "top_logprobs": top})
    response = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "..."},
             "logprobs": {"content": [], "refusal": None}, "finish_reason": "length"},
            {"index": 1, "message": {"role": "assistant", "content": "..."},
             "logprobs": {"content": content, "refusal": None}, "finish_reason": "length"},
        ],
    }  # fmt: skip
    if objects:  # the client's objects: attributes instead of keys

        def ns(x):
            if isinstance(x, dict):
                return SimpleNamespace(**{k: ns(v) for k, v in x.items()})
            if isinstance(x, list) and x and isinstance(x[0], dict):
                return [ns(v) for v in x]
            return x

        return ns(response)
    return response


@pytest.mark.parametrize("objects", [False, True])
def test_from_openai_chat_round_trip(objects):
    teacher = random_teacher(_gen("chat", objects), (7,), 5, low_id=1)
    response = _chat_response(teacher, objects=objects)
    got = from_openai_chat(response, FakeTokenizer(), choice=1, k=5)
    assert_same_teacher(got, teacher)
    # the choice, its logprobs and its content list are accepted too
    choice = response["choices"][1] if not objects else response.choices[1]
    assert_same_teacher(from_openai_chat(choice, FakeTokenizer(), k=5), teacher)
    lps = choice["logprobs"] if not objects else choice.logprobs
    assert_same_teacher(from_openai_chat(lps, FakeTokenizer(), k=5), teacher)
    content = lps["content"] if not objects else lps.content
    assert_same_teacher(from_openai_chat(content, FakeTokenizer(), k=5), teacher)
    # a callable str -> int, and vLLM's "token_id:N" form without a tokenizer
    assert_same_teacher(from_openai_chat(content, lambda s: int(s[1:]), k=5), teacher)
    as_ids = _chat_response(teacher, token=lambda i: f"token_id:{i}")
    assert_same_teacher(from_openai_chat(as_ids, choice=1, k=5), teacher)


def test_from_openai_chat_unknown_tokens():
    teacher = random_teacher(_gen("chat-unk"), (4,), 4, low_id=1, full_rows=True)
    response = _chat_response(teacher)
    content = response["choices"][1]["logprobs"]["content"]
    content[2]["top_logprobs"][1]["token"] = " not-in-vocab"
    with pytest.raises(ValueError, match=r"content\[2\]: token ' not-in-vocab': the tokenizer"):
        from_openai_chat(response, FakeTokenizer(), choice=1)
    got = from_openai_chat(response, FakeTokenizer(), choice=1, on_unknown="drop")
    # the dropped entry leaves row 2 with its other three, then padding
    ids, lps, mask = teacher.token_ids.clone(), teacher.logprobs.clone(), teacher.mask.clone()
    ids[2, :3], lps[2, :3] = teacher.token_ids[2, [0, 2, 3]], teacher.logprobs[2, [0, 2, 3]]
    mask[2, 3] = False
    assert_same_teacher(got, TopKTeacher(ids, lps, mask))
    # the unknown token itself maps (to unk), a callable raising KeyError does not
    assert from_openai_chat([{"top_logprobs": [{"token": "<unk>", "logprob": -1.0}]}],
                            FakeTokenizer()).token_ids.tolist() == [[0]]  # fmt: skip
    vocab = FakeTokenizer().vocab
    with pytest.raises(ValueError, match="cannot map"):
        from_openai_chat(response, vocab.__getitem__, choice=1)
    # two tokens mapped to one id, and ids beyond vocab_size
    dup = [{"top_logprobs": [{"token": "a", "logprob": -0.5}, {"token": "b", "logprob": -1.0}]}]
    with pytest.raises(ValueError, match="already taken"):
        from_openai_chat(dup, lambda s: 3)
    got = from_openai_chat(dup, lambda s: 3, on_unknown="drop")
    assert got.token_ids.tolist() == [[3]] and got.logprobs.tolist() == [[-0.5]]
    with pytest.raises(ValueError, match=r"outside \[0, vocab_size=3\)"):
        from_openai_chat(dup, lambda s: 3, vocab_size=3)


def test_from_openai_chat_errors():
    teacher = random_teacher(_gen("chat-err"), (2,), 3, low_id=1)
    response = _chat_response(teacher)
    with pytest.raises(ValueError, match="without a tokenizer, a token must read 'token_id:N'"):
        from_openai_chat(response, choice=1)
    with pytest.raises(IndexError, match="choice 2 is out of range"):
        from_openai_chat(response, FakeTokenizer(), choice=2)
    response["choices"][1]["logprobs"] = None
    with pytest.raises(ValueError, match=r"choices\[1\] carries no logprobs"):
        from_openai_chat(response, FakeTokenizer(), choice=1)
    with pytest.raises(ValueError, match="on_unknown must be"):
        from_openai_chat(response, FakeTokenizer(), on_unknown="skip")
    with pytest.raises(TypeError, match="convert_tokens_to_ids or be a callable"):
        from_openai_chat([], tokenizer=42)
    with pytest.raises(TypeError, match="not an int id"):
        from_openai_chat([{"top_logprobs": [{"token": "a", "logprob": -1.0}]}], lambda s: "3")
    assert from_openai_chat([], FakeTokenizer()).token_ids.shape == (0, 1)


def test_converters_import_no_client_libraries():
    """Duck typing only: no import of vllm, openai or transformers, at any level."""
    import fastkd.topk_io
    import fastkd.topk_producer

    for module in (fastkd.topk_io, fastkd.topk_producer):
        tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
        assert not names & {"vllm", "openai", "transformers", "pickle"}, module.__name__


# --- the on-disk format --------------------------------------------------------------------

ROUNDING = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 0.0}


def assert_stored(got: TopKTeacher, want: TopKTeacher, dtype: str) -> None:
    """Ids exact, logprobs within the format's rounding (relative, plus float16's
    subnormal step)."""
    real = want.valid()
    assert torch.equal(got.valid(), real)
    assert torch.equal(got.token_ids.long()[real], want.token_ids.long()[real])
    err = (got.logprobs.double() - want.logprobs.double())[real].abs()
    subnormal = 2.0**-25 if dtype == "float16" else 0.0
    bound = ROUNDING[dtype] * want.logprobs.double()[real].abs() + subnormal
    assert bool((err <= bound).all()), float((err - bound).max())
    assert bool((got.token_ids[~real] == 0).all())
    assert bool((got.logprobs[~real] == -math.inf).all())


@needs_safetensors
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("mmap", [True, False])
def test_save_load_round_trip(tmp_path, dtype, mmap):
    teacher = random_teacher(_gen("save", dtype), (3, 4), 9)
    path = tmp_path / "t.safetensors"
    save_topk(path, teacher, vocab_size=V, temperature=2.0, softcap=30.0, logprobs_dtype=dtype,
              metadata={"teacher": "random", "split": "train"})  # fmt: skip
    got = load_topk(path, mmap=mmap)
    assert got.token_ids.dtype == torch.int32 and got.mask is None
    assert got.logprobs.dtype == getattr(torch, dtype)
    assert got.token_ids.shape == (3, 4, 9)
    assert_stored(got, teacher, dtype)
    # safetensors' own reader agrees, header included
    with safe_open(str(path), framework="pt") as f:
        assert torch.equal(f.get_tensor("token_ids"), got.token_ids)
        assert torch.equal(f.get_tensor("logprobs"), got.logprobs)
        meta = f.metadata()
    assert meta["format"] == "fastkd.topk" and meta["k"] == "9" and meta["vocab_size"] == "53"
    assert meta["logprobs_dtype"] == dtype and float(meta["temperature"]) == 2.0
    assert meta["user.teacher"] == "random" and "fastkd_version" in meta
    reader = TopKReader(path)
    assert (reader.k, reader.vocab_size, reader.temperature, reader.softcap) == (9, V, 2.0, 30.0)
    assert reader.metadata == {"teacher": "random", "split": "train"}
    assert reader.logprobs_dtype == getattr(torch, dtype) and reader.num_batches == 1


@needs_safetensors
def test_float16_bound_is_reached_and_extremes_are_kept(tmp_path):
    # the rounding bound is tight: random logprobs come within a factor 2 of it
    lp = -torch.rand(1, 4000, generator=_gen("tight"), dtype=torch.float64) * 20
    ids = torch.randperm(4000, generator=_gen("tight-ids")).reshape(1, 4000)
    teacher = TopKTeacher(ids, lp.float())
    save_topk(tmp_path / "a", teacher)
    got = load_topk(tmp_path / "a")
    rel = ((got.logprobs.double() - lp.float().double()).abs() / lp.abs()).max()
    assert 2.0**-12 < rel <= 2.0**-11
    # a real logprob below float16's range stays real (clamped), -inf stays padding
    teacher = TopKTeacher(torch.tensor([[1, 2, 3]]), torch.tensor([[-0.5, -1e6, -math.inf]]))
    save_topk(tmp_path / "b", teacher)
    got = load_topk(tmp_path / "b")
    assert got.logprobs.tolist() == [[-0.5, -65504.0, -math.inf]]
    assert got.valid().tolist() == [[True, True, False]]
    save_topk(tmp_path / "b16", TopKTeacher(teacher.token_ids, teacher.logprobs.bfloat16()))
    assert load_topk(tmp_path / "b16").logprobs.tolist() == [[-0.5, -65504.0, -math.inf]]
    # a 1-D teacher (one row) keeps its shape
    one = TopKTeacher(torch.tensor([4, 1]), torch.tensor([-0.1, -3.0]))
    save_topk(tmp_path / "c", one, logprobs_dtype=torch.bfloat16)
    assert load_topk(tmp_path / "c").token_ids.tolist() == [4, 1]


def _file_maps(path) -> list[tuple[int, int]]:
    spans = []
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith(os.fspath(path)):
                lo, hi = line.split()[0].split("-")
                spans.append((int(lo, 16), int(hi, 16)))
    return spans


@needs_safetensors
@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps")
def test_mmap_reads_are_views_of_the_file(tmp_path):
    teacher = random_teacher(_gen("mmap"), (64,), 16, full_rows=True)
    path = tmp_path / "m.safetensors"
    save_topk(path, teacher)
    got = load_topk(path, mmap=True)
    spans = _file_maps(path)
    assert any(lo <= got.logprobs.data_ptr() < hi for lo, hi in spans)
    assert any(lo <= got.token_ids.data_ptr() < hi for lo, hi in spans)
    got.logprobs[0, 0] = 1.0  # private: the file is not written
    assert load_topk(path, mmap=False).logprobs[0, 0] != 1.0
    del got
    copy = load_topk(path, mmap=False)
    assert not any(lo <= copy.logprobs.data_ptr() < hi for lo, hi in _file_maps(path))
    assert_stored(copy, teacher, "float16")


@needs_safetensors
def test_reads_a_file_written_by_safetensors_alone(tmp_path):
    """An independent writer: the header as documented, through safetensors' save_file."""
    ids = torch.tensor([[5, 2, 0], [1, 9, 0]], dtype=torch.int32)
    lps = torch.tensor([[-0.25, -2.0, -math.inf], [-1.0, -1.5, -math.inf]], dtype=torch.bfloat16)
    meta = {"format": "fastkd.topk", "format_version": "1", "k": "3",
            "logprobs_dtype": "bfloat16", "vocab_size": "10"}  # fmt: skip
    save_file({"logprobs": lps, "token_ids": ids}, str(tmp_path / "x"), metadata=meta)
    got = load_topk(tmp_path / "x")
    assert torch.equal(got.token_ids, ids) and torch.equal(got.logprobs, lps)
    reader = TopKReader(tmp_path / "x")
    assert reader.vocab_size == 10 and reader.temperature is None and reader.batch_shapes == [(2,)]


def _stream(gen, n=7):
    """Batches of varying lead shapes; some with a smaller K than the cache's 6."""
    shapes = [(2, 3), (1, 5), (4,), (3, 2), (0, 4), (2, 2), (5,)][:n]
    ks = [6, 6, 4, 6, 6, 5, 6][:n]
    return [random_teacher(gen, s, k) for s, k in zip(shapes, ks, strict=True)]


def _padded(t: TopKTeacher, k: int) -> TopKTeacher:
    """t with its K widened to k by padding."""
    extra = k - t.k
    pad = (*t.lead_shape, extra)
    return TopKTeacher(
        torch.cat([t.token_ids, torch.zeros(pad, dtype=torch.long)], -1),
        torch.cat([t.logprobs, torch.full(pad, -math.inf)], -1),
        torch.cat([t.mask, torch.zeros(pad, dtype=torch.bool)], -1),
    )


def _rows(batches, k):
    flat = [_padded(b, k) for b in batches]
    return TopKTeacher(
        torch.cat([b.token_ids.reshape(-1, k) for b in flat]),
        torch.cat([b.logprobs.reshape(-1, k) for b in flat]),
        torch.cat([b.mask.reshape(-1, k) for b in flat]),
    )


@needs_safetensors
@pytest.mark.parametrize("mmap", [True, False])
def test_sharded_writer_and_lazy_reader(tmp_path, mmap):
    gen = _gen("shards", mmap)
    batches = _stream(gen)
    # 6 bytes a pair, k = 6: 36 bytes a row; 150 bytes closes a shard after 5+ rows
    with TopKShardWriter(tmp_path / "c", k=6, vocab_size=V, temperature=1.5,
                         shard_bytes=150, metadata={"run": "7"}) as writer:  # fmt: skip
        for b in batches:
            writer.write(b)
    n = sum(b.lead_shape.numel() for b in batches)
    assert writer.rows_written == n == 30 and writer.batches_written == 7
    names = sorted(os.listdir(tmp_path / "c"))
    assert names[0] == "index.json" and len(names) > 3, names
    index = json.loads((tmp_path / "c" / "index.json").read_text())
    assert index["complete"] and index["rows"] == n and index["k"] == 6
    reader = TopKReader(tmp_path / "c", mmap=mmap)
    all_rows = _rows(batches, 6)
    assert len(reader) == n and reader.num_batches == 7 and reader.k == 6
    assert reader.batch_shapes == [tuple(b.lead_shape) for b in batches]
    assert (reader.vocab_size, reader.temperature, reader.metadata) == (V, 1.5, {"run": "7"})
    for j, b in enumerate(batches):
        got = reader.batch(j)
        assert got.token_ids.shape == (*b.lead_shape, 6)
        assert_stored(got, _padded(b, 6), "float16")
    assert [t.token_ids.shape for t in reader.iter_batches()] == [
        (*b.lead_shape, 6) for b in batches
    ]
    for key in (slice(None), slice(3, 29), slice(5, 6), slice(38, 100), slice(7, 7),
                slice(1, 30, 4), slice(None, None, -3)):  # fmt: skip
        sel = torch.tensor(range(n)[key], dtype=torch.long)
        want = TopKTeacher(all_rows.token_ids[sel], all_rows.logprobs[sel], all_rows.mask[sel])
        assert_stored(reader[key], want, "float16")
    index = torch.randint(-n, n, (50,), generator=gen)
    for key in (index, index.numpy(), index.tolist(), []):
        sel = torch.as_tensor(key, dtype=torch.long) % n
        want = TopKTeacher(all_rows.token_ids[sel], all_rows.logprobs[sel], all_rows.mask[sel])
        assert_stored(reader[key], want, "float16")
    row = reader[-1]
    assert row.token_ids.shape == (6,)
    assert torch.equal(row.token_ids.long(), reader[n - 1 : n].token_ids[0].long())
    assert torch.equal(reader[torch.tensor(3)].token_ids, reader[3].token_ids)
    # every shard is a cache of its own; the whole directory loads as (N, K)
    first = load_topk(tmp_path / "c" / "shard-00000.safetensors")  # one batch: its shape
    assert first.token_ids.shape == (2, 3, 6)
    assert torch.equal(first.token_ids.reshape(6, 6), reader[:6].token_ids)
    assert_stored(load_topk(tmp_path / "c", mmap=mmap), all_rows, "float16")


@needs_safetensors
def test_a_producer_pass_cached_and_read_back(tmp_path):
    gen = _gen("producer")
    logits = [torch.randn(2, 8, 300, generator=gen) * 3 for _ in range(3)]
    with TopKShardWriter(tmp_path / "cache", vocab_size=300, temperature=2.0,
                         shard_bytes=1000) as writer:  # fmt: skip
        for x in logits:
            writer.write(topk_logprobs(x, 20, temperature=2.0))
    reader = TopKReader(tmp_path / "cache")
    assert reader.k == 20 and reader.temperature == 2.0
    for j, x in enumerate(logits):
        assert_stored(reader.batch(j), topk_logprobs(x, 20, temperature=2.0), "float16")


@needs_safetensors
def test_single_batch_directory_keeps_its_shape_and_empty_cache(tmp_path):
    teacher = random_teacher(_gen("one"), (2, 3), 4)
    with TopKShardWriter(tmp_path / "one") as w:
        w.write(teacher)
    assert load_topk(tmp_path / "one").token_ids.shape == (2, 3, 4)
    with TopKShardWriter(tmp_path / "none", k=4):
        pass
    got = load_topk(tmp_path / "none")
    assert got.token_ids.shape == (0, 4) and len(TopKReader(tmp_path / "none")) == 0
    with TopKShardWriter(tmp_path / "nothing"):
        pass
    with pytest.raises(ValueError, match="holds no rows and does not record k"):
        load_topk(tmp_path / "nothing")


@needs_safetensors
def test_interrupted_writer_leaves_a_partial_cache(tmp_path):
    batches = _stream(_gen("partial"), 4)
    with (
        pytest.raises(RuntimeError, match="teacher died"),
        TopKShardWriter(tmp_path / "p", k=6, shard_bytes=100) as w,
    ):
        for b in batches:
            w.write(b)
        raise RuntimeError("teacher died")
    with pytest.raises(ValueError, match="incomplete.*allow_partial=True"):
        TopKReader(tmp_path / "p")
    reader = TopKReader(tmp_path / "p", allow_partial=True)
    assert not reader.complete and reader.num_batches == 4
    assert_stored(reader[:], _rows(batches, 6), "float16")
    # without its index, the shards' own headers describe the cache
    os.remove(tmp_path / "p" / "index.json")
    with pytest.raises(ValueError, match="incomplete"):
        TopKReader(tmp_path / "p")
    reader = TopKReader(tmp_path / "p", allow_partial=True)
    assert reader.batch_shapes == [tuple(b.lead_shape) for b in batches]
    assert_stored(reader[:], _rows(batches, 6), "float16")


@needs_safetensors
def test_reading_never_unpickles(tmp_path, monkeypatch):
    teacher = random_teacher(_gen("pickle"), (5,), 3)
    save_topk(tmp_path / "f", teacher)
    with TopKShardWriter(tmp_path / "d", shard_bytes=10) as w:
        w.write(teacher)
        w.write(teacher)

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling")

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"),
                         (torch, "load")):  # fmt: skip
        monkeypatch.setattr(module, name, refuse)
    load_topk(tmp_path / "f")
    load_topk(tmp_path / "d", mmap=False)
    TopKReader(tmp_path / "d")[[0, 7]]


# --- bad inputs ------------------------------------------------------------------------------


@needs_safetensors
def test_save_rejects_bad_teachers_and_options(tmp_path):
    ids, lp = torch.tensor([[1, 2]]), torch.tensor([[-0.5, -1.0]])
    path = tmp_path / "x"
    with pytest.raises(TypeError, match="teacher must be a fastkd.TopKTeacher"):
        save_topk(path, (ids, lp))
    with pytest.raises(ValueError, match="NaN on an unmasked entry"):
        save_topk(path, TopKTeacher(ids, torch.tensor([[-0.5, float("nan")]])))
    masked_nan = torch.tensor([[-0.5, float("nan")]])
    save_topk(path, TopKTeacher(ids, masked_nan, torch.tensor([[True, False]])))  # fine
    with pytest.raises(ValueError, match=r"\+inf on an unmasked entry"):
        save_topk(path, TopKTeacher(ids, torch.tensor([[math.inf, -1.0]])))
    with pytest.raises(ValueError, match=r"token_ids must lie in \[0, vocab_size=2\)"):
        save_topk(path, TopKTeacher(ids, lp), vocab_size=2)
    with pytest.raises(ValueError, match=r"token_ids must lie in \[0, 2\*\*31\)"):
        save_topk(path, TopKTeacher(ids - 2, lp))
    with pytest.raises(ValueError, match="logprobs_dtype must be one of"):
        save_topk(path, TopKTeacher(ids, lp), logprobs_dtype="int8")
    with pytest.raises(ValueError, match="vocab_size must lie in"):
        save_topk(path, TopKTeacher(ids, lp), vocab_size=0)
    with pytest.raises(ValueError, match="temperature must be"):
        save_topk(path, TopKTeacher(ids, lp), temperature=0.0)
    with pytest.raises(TypeError, match="metadata must map str to str"):
        save_topk(path, TopKTeacher(ids, lp), metadata={"n": 3})


@needs_safetensors
def test_writer_rejects_misuse(tmp_path):
    t = TopKTeacher(torch.tensor([[1, 2, 3]]), torch.tensor([[-0.5, -1.0, -2.0]]))
    with (
        TopKShardWriter(tmp_path / "w", k=2) as w,
        pytest.raises(ValueError, match="K = 3 pairs per row, more than the cache's k = 2"),
    ):
        w.write(t)
    with pytest.raises(ValueError, match="write\\(\\) on a closed"):
        w.write(t)
    with pytest.raises(FileExistsError, match="already holds a top-k cache"):
        TopKShardWriter(tmp_path / "w")
    with pytest.raises(ValueError, match="shard_bytes must be >= 1"):
        TopKShardWriter(tmp_path / "v", shard_bytes=0)
    with pytest.raises(TypeError, match="teacher must be a fastkd.TopKTeacher"):
        TopKShardWriter(tmp_path / "u").write({"ids": 1})


@needs_safetensors
def test_reader_rejects_foreign_and_broken_files(tmp_path):
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="not a fastkd top-k file"):
        load_topk(tmp_path / "model.safetensors")
    (tmp_path / "junk").write_bytes(b"\x00" * 3)
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_topk(tmp_path / "junk")
    (tmp_path / "junk2").write_bytes(struct_header(10**6) + b"{}")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_topk(tmp_path / "junk2")
    teacher = random_teacher(_gen("broken"), (4,), 3)
    save_topk(tmp_path / "t", teacher)
    data = (tmp_path / "t").read_bytes()
    (tmp_path / "cut").write_bytes(data[:-5])
    with pytest.raises(ValueError, match="outside the file"):
        load_topk(tmp_path / "cut")
    with pytest.raises(FileNotFoundError, match="no top-k cache"):
        load_topk(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no index, no shards"):
        TopKReader(tmp_path / "empty")
    # an index naming a file outside the cache
    with TopKShardWriter(tmp_path / "c") as w:
        w.write(teacher)
    index_path = tmp_path / "c" / "index.json"
    index = json.loads(index_path.read_text())
    index["shards"][0]["file"] = "../t"
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="outside the cache"):
        TopKReader(tmp_path / "c")
    index["shards"][0]["file"] = "shard-00000.safetensors"
    index["shards"][0]["rows"] = 5
    index["rows"] = 5
    index["shards"][0]["batch_shapes"] = [[5]]
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="does not match the cache's index"):
        TopKReader(tmp_path / "c")[0]
    reader = TopKReader(tmp_path / "t")
    with pytest.raises(IndexError, match="row 4 is out of range"):
        reader[4]
    with pytest.raises(IndexError, match="out of range"):
        reader[[0, 9]]
    with pytest.raises(IndexError, match="batch 1 is out of range"):
        reader.batch(1)
    with pytest.raises(TypeError, match="a row index must be"):
        reader[1.5]
    with pytest.raises(TypeError, match="a row index must be"):
        reader[[[0]]]


def struct_header(n: int) -> bytes:
    return int(n).to_bytes(8, "little")


@needs_safetensors
def test_reading_needs_no_safetensors_and_writing_says_what_to_install(tmp_path, monkeypatch):
    teacher = random_teacher(_gen("no-safetensors"), (3,), 2)
    save_topk(tmp_path / "f", teacher)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # import fails from here on
    assert_stored(load_topk(tmp_path / "f"), teacher, "float16")
    with pytest.raises(ImportError, match=r"pip install 'fastkd\[topk\]'"):
        save_topk(tmp_path / "g", teacher)
    with pytest.raises(ImportError, match="safetensors"):
        TopKShardWriter(tmp_path / "d")
