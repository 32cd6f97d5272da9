"""Top-k teachers in and out: the peers' formats to :class:`fastkd.TopKTeacher`, and a compact
on-disk cache (design.md §4).

Converters (pure functions; nothing here imports vllm, openai or transformers):

- :func:`from_axolotl`: axolotl's ``target_token_ids``, ``target_logprobs``, ``target_mask``;
- :func:`from_trl`: TRL's (and its vLLM server's) ``topk_token_ids``, ``topk_logprobs``, padded
  with -inf;
- :func:`from_vllm_logprobs`: vLLM's per-position ``{token_id: Logprob}`` dicts (prompt or
  sample logprobs);
- :func:`from_openai_chat`: a chat-completions response's ``top_logprobs``, mapped to ids
  through the caller's tokenizer.

Every converter returns a TopKTeacher whose padding entries hold token id 0 and logprob -inf
(and mask False where the format has a mask), so that a padding id never indexes outside the
vocabulary; a NaN logprob on a real entry, or a real entry's id outside [0, vocab_size), is
an error.

The cache: :func:`save_topk` / :func:`load_topk` for one TopKTeacher, :class:`TopKShardWriter`
for a stream of batches (a teacher pass writes its cache batch by batch) and
:class:`TopKReader`, which reads rows, slices or batches lazily. Files are safetensors:
``token_ids`` int32 and ``logprobs`` float16 (or bfloat16, or float32), the mask folded into
the logprobs (padding: id 0, logprob -inf), and the producer's vocabulary size, k,
temperature, soft cap and the fastkd version in the header's metadata. Writing needs the
``safetensors`` package (``pip install fastkd[topk]``); reading does not: the header is JSON
and the tensors are read through ``numpy.memmap``. Nothing is ever unpickled.

Precision: float16 rounds a logprob l to the nearest of its 11 significant bits, an error of
at most ``2**-11 * |l|`` (``2**-25`` below ``|l| = 2**-14``); the probability e^l is then off
by a factor within ``exp(+-2**-11 * |l|)``: 0.05 % at l = -1, 0.5 % at l = -10. bfloat16
keeps 8 bits: eight times that (0.4 % at l = -1). Finite logprobs below float16's lowest
finite value (-65504, a probability of 0 in any float) are stored as -65504, so that a real
entry never turns into padding. ``logprobs_dtype="float32"`` stores float32 logprobs
exactly. A (token, logprob) pair takes 6 bytes in float16: 768 bytes a token at k = 128.
"""

from __future__ import annotations

import json
import math
import operator
import os
import re
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
from torch import Tensor

from ._config import check_dense_tensor, check_number, check_values
from .topk import TopKTeacher

# --- converters ----------------------------------------------------------------------------


def from_axolotl(
    target_token_ids,
    target_logprobs=None,
    target_mask=None,
    *,
    vocab_size: int | None = None,
) -> TopKTeacher:
    """axolotl's KD fields, (B, T, K) each (tensors or nested lists), to a TopKTeacher.

    Pass the three fields, or one mapping (a collated batch or a dataset row) holding them.
    ``target_mask`` (int 0/1 or bool; optional) becomes the mask; masked entries get id 0
    and logprob -inf. The logprobs are passed on as they are: axolotl's are the teacher's at
    its generation temperature, so give the loss ``teacher_temperature`` accordingly (and
    ``teacher_normalization="renormalize"``, as axolotl does).
    """
    if isinstance(target_token_ids, Mapping):
        if target_logprobs is not None or target_mask is not None:
            raise TypeError("pass either a mapping of axolotl's fields or the fields, not both")
        batch = target_token_ids
        _require_keys(batch, ("target_token_ids", "target_logprobs"))
        target_token_ids = batch["target_token_ids"]
        target_logprobs = batch["target_logprobs"]
        target_mask = batch.get("target_mask")
    elif target_logprobs is None:
        raise TypeError("from_axolotl() needs target_logprobs")
    ids = _int_tensor("target_token_ids", target_token_ids)
    lps = _float_tensor("target_logprobs", target_logprobs)
    _check_same_shape(("target_token_ids", ids), ("target_logprobs", lps))
    mask = None
    if target_mask is not None:
        mask = _as_tensor("target_mask", target_mask)
        if mask.is_floating_point() or mask.is_complex():
            raise TypeError(f"target_mask must be a bool or integer (0/1) tensor, got {mask.dtype}")
        _check_same_shape(("target_token_ids", ids), ("target_mask", mask))
        mask = mask.to(ids.device) != 0
    return _clean_teacher(ids, lps, mask, ("target_token_ids", "target_logprobs"), vocab_size)


def from_trl(topk_token_ids, topk_logprobs=None, *, vocab_size: int | None = None) -> TopKTeacher:
    """TRL's server-distillation fields ``topk_token_ids``, ``topk_logprobs`` (B, T, K),
    padded with logprob -inf (TRL pads the ids with 0), to a TopKTeacher without a mask.

    Pass the two fields, or one mapping holding them (TRL's teacher result). The logprobs
    are raw (normalised over the teacher's vocabulary): TRL's loss is
    ``teacher_normalization="raw"`` with ``topk_tail="bucket"``.
    """
    if isinstance(topk_token_ids, Mapping):
        if topk_logprobs is not None:
            raise TypeError("pass either a mapping of TRL's fields or the fields, not both")
        result = topk_token_ids
        _require_keys(result, ("topk_token_ids", "topk_logprobs"))
        topk_token_ids, topk_logprobs = result["topk_token_ids"], result["topk_logprobs"]
    elif topk_logprobs is None:
        raise TypeError("from_trl() needs topk_logprobs")
    ids = _int_tensor("topk_token_ids", topk_token_ids)
    lps = _float_tensor("topk_logprobs", topk_logprobs)
    _check_same_shape(("topk_token_ids", ids), ("topk_logprobs", lps))
    return _clean_teacher(ids, lps, None, ("topk_token_ids", "topk_logprobs"), vocab_size)


def from_vllm_logprobs(
    logprobs: Iterable,
    *,
    k: int | None = None,
    vocab_size: int | None = None,
    device: torch.device | str | None = None,
) -> TopKTeacher:
    """vLLM's logprobs of one sequence, one entry per position, to a (P, K) TopKTeacher.

    Each entry is None (a position without logprobs, as the first of ``prompt_logprobs``)
    or a mapping ``{token_id: Logprob}``: read by duck typing, the values may be objects with
    a ``.logprob`` attribute (vLLM's ``Logprob``), mappings with a ``"logprob"`` key (vLLM's
    JSON) or plain numbers, and the keys ints or decimal strings (JSON). vLLM adds the
    sampled token when it is not among the top-k, so a position may hold k + 1 entries:
    ``k`` keeps the k most probable of each position (K = k); without it, K is the largest
    count. Each row is sorted by decreasing logprob and padded with id 0, logprob -inf and
    mask False. ``token_ids`` int64 and ``logprobs`` float32, on ``device`` (default CPU).
    """
    if isinstance(logprobs, (str, bytes, Mapping)) or not isinstance(logprobs, Iterable):
        raise TypeError(
            "logprobs must be a sequence with one entry per position (None or a "
            f"{{token_id: Logprob}} mapping), got {type(logprobs).__name__}"
        )
    k = _check_optional_count("k", k)
    rows: list[list[tuple[int, float]]] = []
    for pos, entry in enumerate(logprobs):
        if entry is None:
            rows.append([])
            continue
        items = getattr(entry, "items", None)
        if items is None:
            raise TypeError(
                f"logprobs[{pos}] must be None or a {{token_id: Logprob}} mapping, got "
                f"{type(entry).__name__}"
            )
        row, seen = [], set()
        for key, value in items():
            tid = _token_id_key(key, pos)
            if tid in seen:
                raise ValueError(f"logprobs[{pos}] holds token id {tid} twice")
            seen.add(tid)
            row.append((tid, _logprob_value(value, pos, tid)))
        rows.append(row)
    return _rows_to_teacher(rows, k, vocab_size, device, "logprobs")


_TOKEN_ID_FORM = re.compile(r"token_id:(\d+)")


def from_openai_chat(
    response,
    tokenizer=None,
    *,
    choice: int = 0,
    on_unknown: str = "error",
    k: int | None = None,
    vocab_size: int | None = None,
    device: torch.device | str | None = None,
) -> TopKTeacher:
    """A chat-completions response's ``top_logprobs`` to a (P, K) TopKTeacher, one row per
    generated token of ``choices[choice]``.

    ``response``: the response (a dict from JSON or the client's object), one of its
    choices, the choice's ``logprobs``, or its ``logprobs.content`` list; each position has
    ``top_logprobs``, a list of {token, logprob} (dicts or objects). The sampled token is
    used only through ``top_logprobs``.

    ``tokenizer`` maps each token string to the student's token id: an object with
    ``convert_tokens_to_ids`` (Hugging Face), or a callable ``str -> int``. A token it cannot
    map is one for which it returns None, raises KeyError or ValueError, returns the unknown
    token's id (for a token other than the unknown token itself), or returns an id outside
    [0, vocab_size). ``on_unknown="error"`` (default) raises a ValueError naming the position
    and the token; ``"drop"`` drops the entry (it becomes padding, so the teacher's mass over
    the row shrinks by its probability). Two tokens of one position mapped to the same id
    are treated alike (with "drop", the more probable one is kept). Without a tokenizer,
    every token must be of the form ``"token_id:123"`` (vLLM's OpenAI server with
    ``return_tokens_as_token_ids``).

    Beware: the API returns decoded text (``" Hello"``), while ``convert_tokens_to_ids``
    wants vocabulary strings (``"ĠHello"`` for byte-level BPE): for such tokenizers pass a
    callable that maps the text, e.g. through the tokenizer's ``encode`` when it gives one
    id, or ask the server for token ids.

    Rows are sorted by decreasing logprob; ``k`` keeps the k most probable of each row
    (K = k), otherwise K is the largest count; padding is id 0, logprob -inf, mask False.
    """
    if on_unknown not in ("error", "drop"):
        raise ValueError(f"on_unknown must be 'error' or 'drop', got {on_unknown!r}")
    k = _check_optional_count("k", k)
    if vocab_size is not None:
        vocab_size = _check_vocab_size(vocab_size)
    content = _chat_content(response, choice)
    to_id = _token_mapper(tokenizer)
    unmapped = (
        "without a tokenizer, a token must read 'token_id:N'"
        if tokenizer is None
        else "the tokenizer cannot map it"
    )
    rows: list[list[tuple[int, float]]] = []
    for pos, item in enumerate(content):
        top = _field(item, "top_logprobs")
        row: list[tuple[int, float]] = []
        seen: set[int] = set()
        pairs = []
        for j, cand in enumerate(top or ()):
            token, value = _field(cand, "token"), _field(cand, "logprob")
            if not isinstance(token, str):
                raise TypeError(
                    f"content[{pos}].top_logprobs[{j}].token must be a str, got "
                    f"{type(token).__name__}"
                )
            pairs.append((token, _logprob_value(value, pos, token)))
        pairs.sort(key=lambda p: -p[1])  # stable: ties keep the response's order
        for token, value in pairs:
            tid = to_id(token)
            problem = None
            if tid is None:
                problem = unmapped
            elif vocab_size is not None and not tid < vocab_size:
                problem = f"its id {tid} is outside [0, vocab_size={vocab_size})"
            elif tid in seen:
                problem = f"its id {tid} is already taken by another token of this position"
            if problem is not None:
                if on_unknown == "error":
                    raise ValueError(
                        f"content[{pos}]: token {token!r}: {problem} (on_unknown='drop' drops "
                        "such entries)"
                    )
                continue
            seen.add(tid)
            row.append((tid, value))
        rows.append(row)
    return _rows_to_teacher(rows, k, vocab_size, device, "content")


# --- converter helpers ---------------------------------------------------------------------


def _field(obj, name):
    """obj[name] for mappings (JSON), obj.name otherwise (client objects); None if absent."""
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _require_keys(mapping: Mapping, keys) -> None:
    missing = [key for key in keys if key not in mapping]
    if missing:
        raise KeyError(f"the mapping lacks {', '.join(map(repr, missing))}")


def _as_tensor(name: str, x) -> Tensor:
    if isinstance(x, Tensor):
        check_dense_tensor(name, x)
        return x
    try:
        return torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(
            f"{name} must be a tensor, an array or a nested (rectangular) list: {e}"
        ) from None


def _int_tensor(name: str, x) -> Tensor:
    t = _as_tensor(name, x)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got dtype {t.dtype}")
    if t.dim() == 0 or t.shape[-1] == 0:
        raise ValueError(f"{name} must be (..., K) with K >= 1, got shape {tuple(t.shape)}")
    return t.to(torch.int64)


def _float_tensor(name: str, x) -> Tensor:
    t = _as_tensor(name, x)
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold real numbers, got dtype {t.dtype}")
    return t if t.is_floating_point() else t.to(torch.float32)


def _check_same_shape(a: tuple[str, Tensor], b: tuple[str, Tensor]) -> None:
    (na, ta), (nb, tb) = a, b
    if ta.shape != tb.shape:
        raise ValueError(
            f"{na} and {nb} must have one shape (..., K), got {tuple(ta.shape)} and "
            f"{tuple(tb.shape)}"
        )


def _clean_teacher(ids: Tensor, lps: Tensor, mask: Tensor | None, names, vocab_size):
    """Checks the real entries and writes (0, -inf) on the padding."""
    lps = lps.to(ids.device)
    present = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask
    check_values(~(present & torch.isnan(lps)), f"{names[1]} holds NaN on an unmasked entry")
    check_values(~(present & (lps == math.inf)), f"{names[1]} holds +inf on an unmasked entry")
    real = present & (lps > -math.inf)
    in_range = ids >= 0
    what = "non-negative"
    if vocab_size is not None:
        vocab_size = _check_vocab_size(vocab_size)
        in_range &= ids < vocab_size
        what = f"in [0, vocab_size={vocab_size})"
    check_values(in_range | ~real, f"{names[0]} must be {what} on real entries")
    ids = torch.where(real, ids, 0)
    lps = torch.where(real, lps, -math.inf)
    return TopKTeacher(ids, lps, mask)


def _check_optional_count(name: str, value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _check_vocab_size(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"vocab_size must be an int, got {type(value).__name__}")
    if not 1 <= value <= 2**31:
        raise ValueError(f"vocab_size must lie in [1, 2**31] (int32 token ids), got {value}")
    return value


def _token_id_key(key, pos: int) -> int:
    if isinstance(key, str) and key.strip().isdigit():
        return int(key)
    if not isinstance(key, bool):
        try:
            tid = operator.index(key)
        except TypeError:
            pass
        else:
            if tid >= 0:
                return tid
    raise ValueError(f"logprobs[{pos}] has a key {key!r} that is not a token id (an int >= 0)")


def _logprob_value(value, pos: int, token) -> float:
    """A number, an object's ``.logprob`` (vLLM's Logprob, the client's objects) or a
    mapping's ``"logprob"`` (JSON), as a float."""
    raw = value
    if isinstance(value, Mapping):
        value = value.get("logprob")
    elif not isinstance(value, (int, float, np.number)):
        value = getattr(value, "logprob", None)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(
            f"position {pos}, token {token!r}: a logprob must be a number, an object with "
            f".logprob or a mapping with 'logprob', got {type(raw).__name__}"
        )
    value = float(value)
    if math.isnan(value) or value == math.inf:
        raise ValueError(f"position {pos}, token {token!r}: logprob {value} is not <= 0")
    return value


def _rows_to_teacher(rows, k, vocab_size, device, what: str) -> TopKTeacher:
    """Ragged rows of (id, logprob) to a padded (P, K) TopKTeacher, rows sorted by decreasing
    logprob and cut to k."""
    if vocab_size is not None:
        vocab_size = _check_vocab_size(vocab_size)
    width = k if k is not None else max((len(r) for r in rows), default=0)
    width = max(width, 1)  # TopKTeacher needs K >= 1: a row of padding at least
    ids = np.zeros((len(rows), width), dtype=np.int64)
    lps = np.full((len(rows), width), -np.inf, dtype=np.float32)
    mask = np.zeros((len(rows), width), dtype=bool)
    for p, row in enumerate(rows):
        row = sorted(row, key=lambda e: -e[1])[:width]
        for j, (tid, lp) in enumerate(row):
            if vocab_size is not None and tid >= vocab_size:
                raise ValueError(
                    f"{what}[{p}]: token id {tid} is outside [0, vocab_size={vocab_size})"
                )
            ids[p, j], lps[p, j], mask[p, j] = tid, lp, True
    ids_t, lps_t = torch.from_numpy(ids), torch.from_numpy(lps)
    lps_t = torch.where(torch.from_numpy(mask), lps_t, -math.inf)
    mask_t = torch.from_numpy(mask)
    if device is not None:
        ids_t, lps_t, mask_t = (t.to(device) for t in (ids_t, lps_t, mask_t))
    return TopKTeacher(ids_t, lps_t, mask_t)


def _chat_content(response, choice: int) -> list:
    """``choices[choice].logprobs.content`` of a response, a choice, a logprobs object or
    the content list itself."""
    if isinstance(choice, bool) or not isinstance(choice, int):
        raise TypeError(f"choice must be an int, got {type(choice).__name__}")
    obj, where = response, "response"
    choices = _field(obj, "choices") if not isinstance(obj, (list, tuple)) else None
    if choices is not None:
        if not -len(choices) <= choice < len(choices):
            raise IndexError(f"choice {choice} is out of range: the response has {len(choices)}")
        obj, where = choices[choice], f"choices[{choice}]"
    if not isinstance(obj, (list, tuple)):
        if _field(obj, "content") is None or _field(obj, "message") is not None:
            # a choice: go through its logprobs
            obj = _field(obj, "logprobs")
            if obj is None:
                raise ValueError(
                    f"{where} carries no logprobs: request them with logprobs=True and "
                    "top_logprobs=k"
                )
        obj = _field(obj, "content")
        if obj is None:
            raise ValueError(f"{where}'s logprobs carry no content (token) logprobs")
    if not isinstance(obj, (list, tuple)):
        raise TypeError(f"{where}: logprobs.content must be a list, got {type(obj).__name__}")
    return list(obj)


def _token_mapper(tokenizer) -> Callable[[str], int | None]:
    """A function token string -> id, or None when it cannot be mapped."""
    if tokenizer is None:

        def from_form(token: str) -> int | None:
            match = _TOKEN_ID_FORM.fullmatch(token)
            return int(match.group(1)) if match else None

        return _guarded(from_form)
    convert = getattr(tokenizer, "convert_tokens_to_ids", None)
    if convert is not None:
        unk_id = getattr(tokenizer, "unk_token_id", None)
        unk = getattr(tokenizer, "unk_token", None)

        def from_vocab(token: str) -> int | None:
            tid = convert(token)
            if tid is None or (unk_id is not None and tid == unk_id and token != unk):
                return None
            return tid

        return _guarded(from_vocab)
    if callable(tokenizer):
        return _guarded(tokenizer)
    raise TypeError(
        "tokenizer must have convert_tokens_to_ids or be a callable str -> int, got "
        f"{type(tokenizer).__name__}"
    )


def _guarded(fn) -> Callable[[str], int | None]:
    def to_id(token: str) -> int | None:
        try:
            tid = fn(token)
        except (KeyError, ValueError):
            return None
        if tid is None:
            return None
        if isinstance(tid, bool):
            raise TypeError(f"the tokenizer returned a bool for {token!r}, not a token id")
        try:
            tid = operator.index(tid)
        except TypeError:
            raise TypeError(
                f"the tokenizer returned {type(tid).__name__} for {token!r}, not an int id"
            ) from None
        return tid if tid >= 0 else None

    return to_id


# --- the on-disk format --------------------------------------------------------------------

FORMAT = "fastkd.topk"
FORMAT_VERSION = "1"
INDEX_FORMAT = "fastkd.topk-shards"
INDEX_NAME = "index.json"
SHARD_NAME = "shard-{:05d}.safetensors"
_SHARD_RE = re.compile(r"shard-(\d{5,})\.safetensors")
_USER_PREFIX = "user."
_LOGPROB_DTYPES = {
    "float16": (torch.float16, "F16"),
    "bfloat16": (torch.bfloat16, "BF16"),
    "float32": (torch.float32, "F32"),
}
# Little-endian, as safetensors stores them; bfloat16 read as uint16 and viewed in torch.
_NUMPY_DTYPES = {"I32": np.dtype("<i4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
                 "F32": np.dtype("<f4")}  # fmt: skip
_MAX_HEADER = 100_000_000  # safetensors' own limit
DEFAULT_SHARD_BYTES = 256 << 20


def _fastkd_version() -> str:
    try:
        from . import __version__
    except ImportError:  # fastkd/__init__.py not fully imported (cannot happen at call time)
        return "unknown"
    return __version__


def _safetensors_save():
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ImportError(
            "writing a top-k cache needs the safetensors package: pip install 'fastkd[topk]' "
            "(or pip install safetensors); reading does not"
        ) from None
    return save_file


def _check_logprobs_dtype(value) -> str:
    if isinstance(value, torch.dtype):
        names = {dtype: name for name, (dtype, _) in _LOGPROB_DTYPES.items()}
        if value in names:
            return names[value]
    elif value in _LOGPROB_DTYPES:
        return value
    raise ValueError(
        f"logprobs_dtype must be one of {list(_LOGPROB_DTYPES)} (or the torch dtype), got {value!r}"
    )


def _producer_metadata(vocab_size, temperature, softcap, logprobs_dtype, metadata) -> dict:
    """The header metadata common to every file of one cache (strings, as safetensors
    wants)."""
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fastkd_version": _fastkd_version(),
        "logprobs_dtype": _check_logprobs_dtype(logprobs_dtype),
        "padding": "token id 0, logprob -inf",
    }
    if vocab_size is not None:
        meta["vocab_size"] = str(_check_vocab_size(vocab_size))
    if temperature is not None:
        meta["temperature"] = repr(check_number("temperature", temperature, positive=True))
    if softcap is not None:
        meta["softcap"] = repr(check_number("softcap", softcap, positive=True))
    if metadata is not None:
        if not isinstance(metadata, Mapping):
            raise TypeError(f"metadata must be a mapping str -> str, got {type(metadata).__name__}")
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(
                    f"metadata must map str to str (safetensors' header), got {key!r}: "
                    f"{type(value).__name__}"
                )
            meta[_USER_PREFIX + key] = value
    return meta


def _encode(teacher: TopKTeacher, vocab_size: int | None, logprobs_dtype: str, width: int):
    """(rows, width) int32 ids and 16-bit (or float32) logprobs on the CPU: padding folded
    into (0, -inf), columns beyond the teacher's K padded, finite logprobs clamped to the
    format's finite range."""
    if not isinstance(teacher, TopKTeacher):
        raise TypeError(f"teacher must be a fastkd.TopKTeacher, got {type(teacher).__name__}")
    ids, lps = teacher.token_ids, teacher.logprobs.detach()
    present = torch.ones_like(ids, dtype=torch.bool) if teacher.mask is None else teacher.mask
    real = present & (lps > -math.inf)
    high = 2**31 if vocab_size is None else vocab_size
    bad = torch.stack(
        [
            (present & torch.isnan(lps)).any(),
            (present & (lps == math.inf)).any(),
            (real & ((ids < 0) | (ids >= high))).any(),
        ]
    ).tolist()  # one synchronisation
    if bad[0]:
        raise ValueError("teacher.logprobs holds NaN on an unmasked entry")
    if bad[1]:
        raise ValueError("teacher.logprobs holds +inf on an unmasked entry")
    if bad[2]:
        what = "[0, 2**31) (int32)" if vocab_size is None else f"[0, vocab_size={vocab_size})"
        raise ValueError(f"teacher.token_ids must lie in {what} on real entries")
    dtype = _LOGPROB_DTYPES[logprobs_dtype][0]
    info = torch.finfo(dtype)
    ids32 = torch.where(real, ids, 0).to(torch.int32).reshape(-1, teacher.k)
    # clamped in float32 at least: a bf16 teacher cannot hold float16's -65504 exactly
    wide = lps.to(torch.promote_types(lps.dtype, torch.float32))
    lp = torch.where(real, wide.clamp(info.min, info.max), -math.inf).to(dtype)
    lp = lp.reshape(-1, teacher.k)
    if width > teacher.k:
        extra = width - teacher.k
        ids32 = torch.cat([ids32, ids32.new_zeros(ids32.shape[0], extra)], 1)
        lp = torch.cat([lp, lp.new_full((lp.shape[0], extra), -math.inf)], 1)
    return ids32.cpu().contiguous(), lp.cpu().contiguous()


def _write_safetensors(path: str, ids: Tensor, lps: Tensor, meta: dict) -> None:
    """One file, written next to its name and renamed into place (a reader never sees half
    a file)."""
    save_file = _safetensors_save()
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_file({"token_ids": ids, "logprobs": lps}, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_topk(
    path: str | os.PathLike,
    teacher: TopKTeacher,
    *,
    vocab_size: int | None = None,
    temperature: float | None = None,
    softcap: float | None = None,
    logprobs_dtype: str | torch.dtype = "float16",
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes ``teacher`` to one safetensors file at ``path``, in its shape (..., K).

    ``token_ids`` int32, ``logprobs`` in ``logprobs_dtype`` (float16 by default; see the
    module's note on precision); the mask is folded into the logprobs (padding: id 0,
    logprob -inf). ``vocab_size`` (checked against the real ids), ``temperature`` and
    ``softcap`` (the producer's) and ``metadata`` (str -> str, yours) go to the header,
    with K and the fastkd version. Needs the safetensors package.
    """
    if not isinstance(teacher, TopKTeacher):
        raise TypeError(f"teacher must be a fastkd.TopKTeacher, got {type(teacher).__name__}")
    dtype = _check_logprobs_dtype(logprobs_dtype)
    if vocab_size is not None:
        vocab_size = _check_vocab_size(vocab_size)
    meta = _producer_metadata(vocab_size, temperature, softcap, dtype, metadata)
    ids, lps = _encode(teacher, vocab_size, dtype, teacher.k)
    shape = (*teacher.lead_shape, teacher.k)
    meta.update(k=str(teacher.k), batch_shapes=json.dumps([list(teacher.lead_shape)]))
    _write_safetensors(os.fspath(path), ids.view(shape), lps.view(shape), meta)


def load_topk(
    path: str | os.PathLike,
    mmap: bool = True,
    *,
    device: torch.device | str | None = None,
) -> TopKTeacher:
    """The TopKTeacher stored at ``path``: a file from :func:`save_topk` (in its shape) or a
    directory from :class:`TopKShardWriter` (its rows (N, K), or the one batch's shape when
    it holds one batch).

    ``token_ids`` int32 and ``logprobs`` in the stored dtype, mask None (padding is
    logprob -inf). ``mmap=True``: the tensors are views of the memory-mapped file (no copy;
    pages are read as they are touched; writes to them stay private), except that a
    directory of several shards is concatenated (a copy). ``mmap=False``: read into memory.
    ``device``: moved there.
    """
    reader = TopKReader(path, mmap=mmap, device=device)
    if reader.num_batches == 1:
        return reader.batch(0)
    if reader.k is None:
        raise ValueError(f"{os.fspath(path)!r} holds no rows and does not record k")
    return reader[:]


class TopKShardWriter:
    """Writes a stream of TopKTeacher batches to a directory of safetensors shards.

    ``write(teacher)`` takes one batch of any shape (..., K); batches are converted at once
    (int32 ids, 16-bit logprobs, on the CPU) and buffered until they reach ``shard_bytes``,
    then written as one shard (``shard-00000.safetensors``, ...) of (rows, K) tensors; a
    batch never straddles two shards. ``index.json`` lists the shards, their rows and the
    batches' shapes, and is rewritten after every shard; ``close()`` (or leaving the
    ``with`` block) writes the last shard and marks the index complete. After an exception
    inside the ``with`` block the buffered batches are still written, but the index stays
    incomplete: :class:`TopKReader` then wants ``allow_partial=True``.

    K is ``k`` when given, else the first batch's; a batch with a smaller K is padded with
    (0, -inf), one with a larger K is an error. The other arguments are
    :func:`save_topk`'s. Every shard is a file :func:`load_topk` reads on its own too.
    The directory may exist but must hold no cache.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        k: int | None = None,
        vocab_size: int | None = None,
        temperature: float | None = None,
        softcap: float | None = None,
        logprobs_dtype: str | torch.dtype = "float16",
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        _safetensors_save()  # fail now, not at the first shard
        self._dtype = _check_logprobs_dtype(logprobs_dtype)
        self.k = _check_optional_count("k", k)
        self.vocab_size = None if vocab_size is None else _check_vocab_size(vocab_size)
        if isinstance(shard_bytes, bool) or not isinstance(shard_bytes, int):
            raise TypeError(f"shard_bytes must be an int, got {type(shard_bytes).__name__}")
        if shard_bytes < 1:
            raise ValueError(f"shard_bytes must be >= 1, got {shard_bytes}")
        self._meta = _producer_metadata(self.vocab_size, temperature, softcap, self._dtype,
                                        metadata)  # fmt: skip
        self._user_metadata = dict(metadata or {})
        self._shard_bytes = shard_bytes
        self.directory = os.fspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        taken = [n for n in os.listdir(self.directory) if n == INDEX_NAME or _SHARD_RE.fullmatch(n)]
        if taken:
            raise FileExistsError(
                f"{self.directory!r} already holds a top-k cache ({sorted(taken)[0]}); write "
                "to an empty directory"
            )
        self._shards: list[dict] = []
        self._buffer: list[tuple[Tensor, Tensor, list[int]]] = []
        self._buffer_bytes = 0
        self.rows_written = 0
        self.batches_written = 0
        self.closed = False

    def write(self, teacher: TopKTeacher) -> None:
        """Appends one batch (..., K)."""
        if self.closed:
            raise ValueError("write() on a closed TopKShardWriter")
        if not isinstance(teacher, TopKTeacher):
            raise TypeError(f"teacher must be a fastkd.TopKTeacher, got {type(teacher).__name__}")
        if self.k is None:
            self.k = teacher.k
        elif teacher.k > self.k:
            raise ValueError(
                f"this batch has K = {teacher.k} pairs per row, more than the cache's k = {self.k}"
            )
        ids, lps = _encode(teacher, self.vocab_size, self._dtype, self.k)
        self._buffer.append((ids, lps, list(teacher.lead_shape)))
        self._buffer_bytes += ids.nbytes + lps.nbytes
        self.rows_written += ids.shape[0]
        self.batches_written += 1
        if self._buffer_bytes >= self._shard_bytes:
            self._flush()

    def close(self) -> None:
        """Writes what is buffered and marks the cache complete (idempotent)."""
        if self.closed:
            return
        self._flush()
        self._write_index(complete=True)
        self.closed = True

    def __enter__(self) -> TopKShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif not self.closed:
            self._flush()  # keep what was written, but leave the cache marked incomplete
            self.closed = True

    def _flush(self) -> None:
        if not self._buffer:
            return
        ids = torch.cat([b[0] for b in self._buffer])
        lps = torch.cat([b[1] for b in self._buffer])
        shapes = [b[2] for b in self._buffer]
        index = len(self._shards)
        name = SHARD_NAME.format(index)
        meta = dict(self._meta)
        meta.update(
            k=str(self.k),
            batch_shapes=json.dumps(shapes),
            shard=str(index),
            row_offset=str(sum(s["rows"] for s in self._shards)),
        )
        _write_safetensors(os.path.join(self.directory, name), ids, lps, meta)
        self._shards.append({"file": name, "rows": ids.shape[0], "batch_shapes": shapes})
        self._buffer, self._buffer_bytes = [], 0
        self._write_index(complete=False)

    def _write_index(self, complete: bool) -> None:
        meta = self._meta
        index = {
            "format": INDEX_FORMAT,
            "format_version": FORMAT_VERSION,
            "complete": complete,
            "fastkd_version": meta["fastkd_version"],
            "k": self.k,
            "vocab_size": self.vocab_size,
            "temperature": float(meta["temperature"]) if "temperature" in meta else None,
            "softcap": float(meta["softcap"]) if "softcap" in meta else None,
            "logprobs_dtype": self._dtype,
            "metadata": self._user_metadata,
            "rows": sum(s["rows"] for s in self._shards),
            "shards": self._shards,
        }
        path = os.path.join(self.directory, INDEX_NAME)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(index, f)
        os.replace(tmp, path)


# --- reading ---------------------------------------------------------------------------


class _Shard:
    """One safetensors file of the cache: its header, read on first use, and its arrays
    through numpy.memmap."""

    def __init__(self, path: str, rows: int | None = None) -> None:
        self.path = path
        self.expected_rows = rows
        self._parsed = None

    def header(self):
        """(metadata, {name: (code, shape, start, stop)}) of the file, checked."""
        if self._parsed is None:
            self._parsed = _read_header(self.path)
        return self._parsed

    def array(self, name: str, k: int) -> np.ndarray:
        """The (rows, k) array ``name`` (a copy-on-write memmap: never written back)."""
        _, tensors = self.header()
        code, shape, start, _ = tensors[name]
        rows = math.prod(shape) // k if k else 0
        if rows == 0:
            return np.empty((0, k), dtype=_NUMPY_DTYPES[code])
        return np.memmap(self.path, dtype=_NUMPY_DTYPES[code], mode="c", offset=start,
                         shape=(rows, k))  # fmt: skip


def _read_header(path: str):
    """Reads and checks a safetensors header: 8 bytes of little-endian length, then JSON."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path!r} is not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise ValueError(f"{path!r} is not a safetensors file (header length {n})")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path!r} is not a safetensors file (header: {e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path!r} is not a safetensors file (header is not an object)")
    meta = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    tensors = {}
    for name, info in header.items():
        try:
            code, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            shape = [int(d) for d in shape]
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path!r}: malformed header entry for {name!r}") from None
        if min(shape, default=0) < 0 or not 0 <= begin <= end or data_start + end > size:
            raise ValueError(f"{path!r}: tensor {name!r} lies outside the file")
        np_dtype = _NUMPY_DTYPES.get(code)
        if np_dtype is not None and math.prod(shape) * np_dtype.itemsize != end - begin:
            raise ValueError(f"{path!r}: tensor {name!r}'s size does not match its shape")
        tensors[name] = (code, shape, data_start + begin, data_start + end)
    return meta, tensors


def _check_topk_file(path: str, meta: dict, tensors: dict) -> tuple[int, str, list]:
    """(k, logprobs dtype code, batch shapes) of a fastkd top-k file, or a clear error."""
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{path!r} is not a fastkd top-k file (its metadata's format is "
            f"{meta.get('format')!r}, not {FORMAT!r})"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path!r} has format version {meta.get('format_version')!r}; this fastkd reads "
            f"{FORMAT_VERSION!r}"
        )
    for name in ("token_ids", "logprobs"):
        if name not in tensors:
            raise ValueError(f"{path!r} lacks the tensor {name!r}")
    ids_code, ids_shape = tensors["token_ids"][:2]
    lp_code, lp_shape = tensors["logprobs"][:2]
    if ids_code != "I32":
        raise ValueError(f"{path!r}: token_ids must be I32, got {ids_code}")
    expected = _LOGPROB_DTYPES.get(meta.get("logprobs_dtype"), (None, None))[1]
    if lp_code != expected:
        raise ValueError(
            f"{path!r}: logprobs are {lp_code} but the metadata says {meta.get('logprobs_dtype')!r}"
        )
    if ids_shape != lp_shape or not ids_shape:
        raise ValueError(f"{path!r}: token_ids {ids_shape} and logprobs {lp_shape} differ")
    try:
        k = int(meta["k"])
        shapes = json.loads(meta.get("batch_shapes", json.dumps([ids_shape[:-1]])))
        shapes = [[int(d) for d in s] for s in shapes]
    except (KeyError, ValueError, TypeError):
        raise ValueError(f"{path!r}: malformed metadata (k, batch_shapes)") from None
    if ids_shape[-1] != k:
        raise ValueError(f"{path!r}: the tensors' last dim {ids_shape[-1]} is not k = {k}")
    rows = math.prod(ids_shape[:-1])
    if sum(math.prod(s) for s in shapes) != rows:
        raise ValueError(f"{path!r}: batch_shapes do not add up to its {rows} rows")
    return k, lp_code, shapes


def _optional_float(meta: Mapping, key: str) -> float | None:
    value = meta.get(key)
    return None if value is None else float(value)


class TopKReader:
    """Reads a top-k cache lazily: a directory from :class:`TopKShardWriter` or a file from
    :func:`save_topk`.

    The cache is a sequence of rows (one per token; ``len(reader)`` of them) grouped in the
    batches that were written. ``reader[i]`` is row i (a TopKTeacher of shape (K,)),
    ``reader[a:b]`` rows a..b-1 (n, K), ``reader[index]`` (a 1-D int tensor, array or list)
    those rows; ``reader.batch(j)`` is the j-th batch in the shape it was written in, and
    ``iter_batches()`` goes through them. Only the rows asked for are read.

    Results: ``token_ids`` int32, ``logprobs`` in the stored dtype (float16 by default),
    mask None (padding is logprob -inf). With ``mmap=True`` (default) a range of rows within
    one shard is a view of the memory-mapped file (no copy; writes stay private); rows
    across shards, index lists and ``mmap=False`` give fresh memory. ``device``: results are
    moved there.

    Attributes: ``k``, ``vocab_size``, ``temperature``, ``softcap`` (the producer's, or
    None), ``logprobs_dtype`` (a torch dtype), ``fastkd_version``, ``metadata`` (the user's
    str -> str), ``complete``, ``num_rows``, ``num_batches``, ``batch_shapes``.

    A directory whose index is missing or not complete (the writer died, or the ``with``
    block raised) is an error unless ``allow_partial=True``; without an index the shards'
    own headers are read. At most ``max_open_shards`` shards are kept mapped at once.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        mmap: bool = True,
        device: torch.device | str | None = None,
        allow_partial: bool = False,
        max_open_shards: int = 64,
    ) -> None:
        self.path = os.fspath(path)
        self.mmap = bool(mmap)
        self.device = None if device is None else torch.device(device)
        self._max_open = max(1, int(max_open_shards))
        self._open: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        if os.path.isdir(self.path):
            self._open_directory(allow_partial)
        elif os.path.isfile(self.path):
            shard = _Shard(self.path)
            meta, tensors = shard.header()
            k, _, shapes = _check_topk_file(self.path, meta, tensors)
            self._shards = [shard]
            self._shard_rows = [sum(math.prod(s) for s in shapes)]
            self._set_info(meta, k, complete=True)
            self.batch_shapes = [tuple(s) for s in shapes]
            self._batch_shard = [0] * len(shapes)
        else:
            raise FileNotFoundError(f"no top-k cache at {self.path!r}")
        self._shard_starts = np.concatenate([[0], np.cumsum(self._shard_rows, dtype=np.int64)])
        self.num_rows = int(self._shard_starts[-1])
        sizes = [math.prod(s) for s in self.batch_shapes]
        self._batch_starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).tolist()

    # --- opening ---

    def _set_info(self, meta: Mapping, k: int | None, complete: bool) -> None:
        self.k = k
        self.vocab_size = int(meta["vocab_size"]) if meta.get("vocab_size") else None
        self.temperature = _optional_float(meta, "temperature")
        self.softcap = _optional_float(meta, "softcap")
        self.logprobs_dtype, code = _LOGPROB_DTYPES[meta["logprobs_dtype"]]
        self._lps_np = _NUMPY_DTYPES[code]
        self.fastkd_version = meta.get("fastkd_version")
        self.metadata = {
            key[len(_USER_PREFIX) :]: value
            for key, value in meta.items()
            if key.startswith(_USER_PREFIX)
        }
        self.complete = complete

    def _open_directory(self, allow_partial: bool) -> None:
        index_path = os.path.join(self.path, INDEX_NAME)
        if os.path.exists(index_path):
            with open(index_path, encoding="utf-8") as f:
                try:
                    index = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{index_path!r} is not valid JSON: {e}") from None
            self._from_index(index_path, index)
        else:
            self._from_shard_headers()
        if not self.complete and not allow_partial:
            raise ValueError(
                f"the top-k cache {self.path!r} is incomplete (its writer was not closed); "
                "pass allow_partial=True to read the shards it has"
            )

    def _from_index(self, index_path: str, index) -> None:
        if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
            raise ValueError(f"{index_path!r} is not a fastkd top-k index")
        if index.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{index_path!r} has format version {index.get('format_version')!r}; this "
                f"fastkd reads {FORMAT_VERSION!r}"
            )
        try:
            shards = index["shards"]
            names = [s["file"] for s in shards]
            rows = [int(s["rows"]) for s in shards]
            shapes = [[tuple(int(d) for d in b) for b in s["batch_shapes"]] for s in shards]
            dtype = index["logprobs_dtype"]
            _LOGPROB_DTYPES[dtype]  # noqa: B018 (a KeyError for an unknown dtype)
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{index_path!r}: malformed index") from None
        for name in names:
            if not isinstance(name, str) or not _SHARD_RE.fullmatch(name):
                raise ValueError(f"{index_path!r} names a shard {name!r} outside the cache")
        self._shards = [
            _Shard(os.path.join(self.path, n), r) for n, r in zip(names, rows, strict=True)
        ]
        self._shard_rows = rows
        meta = {
            "vocab_size": None if index.get("vocab_size") is None else str(index["vocab_size"]),
            "temperature": None if index.get("temperature") is None else index["temperature"],
            "softcap": None if index.get("softcap") is None else index["softcap"],
            "logprobs_dtype": dtype,
            "fastkd_version": index.get("fastkd_version"),
        }
        meta = {key: value for key, value in meta.items() if value is not None}
        meta.update({_USER_PREFIX + key: v for key, v in (index.get("metadata") or {}).items()})
        k = index.get("k")
        self._set_info(meta, None if k is None else int(k), complete=bool(index.get("complete")))
        self.batch_shapes = [s for per_shard in shapes for s in per_shard]
        self._batch_shard = [i for i, per_shard in enumerate(shapes) for _ in per_shard]

    def _from_shard_headers(self) -> None:
        names = sorted(n for n in os.listdir(self.path) if _SHARD_RE.fullmatch(n))
        if not names:
            raise FileNotFoundError(f"{self.path!r} holds no top-k cache (no index, no shards)")
        self._shards, self._shard_rows, self.batch_shapes, self._batch_shard = [], [], [], []
        first_meta, k = None, None
        for i, name in enumerate(names):
            shard = _Shard(os.path.join(self.path, name))
            meta, tensors = shard.header()
            k_i, _, shapes = _check_topk_file(shard.path, meta, tensors)
            if first_meta is None:
                first_meta, k = meta, k_i
            elif k_i != k or meta.get("logprobs_dtype") != first_meta.get("logprobs_dtype"):
                raise ValueError(f"{shard.path!r} does not match the cache's first shard")
            self._shards.append(shard)
            self._shard_rows.append(sum(math.prod(s) for s in shapes))
            self.batch_shapes += [tuple(s) for s in shapes]
            self._batch_shard += [i] * len(shapes)
        self._set_info(first_meta, k, complete=False)

    def _arrays(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Shard i's (rows, K) id and logprob arrays, checked against the index once."""
        if i in self._open:
            self._open.move_to_end(i)
            return self._open[i]
        shard = self._shards[i]
        meta, tensors = shard.header()
        k, code, shapes = _check_topk_file(shard.path, meta, tensors)
        rows = sum(math.prod(s) for s in shapes)
        if (
            k != self.k
            or rows != self._shard_rows[i]
            or (_LOGPROB_DTYPES[meta["logprobs_dtype"]][0] != self.logprobs_dtype)
        ):
            raise ValueError(f"{shard.path!r} does not match the cache's index (k, rows, dtype)")
        arrays = (shard.array("token_ids", k), shard.array("logprobs", k))
        self._open[i] = arrays
        if len(self._open) > self._max_open:
            self._open.popitem(last=False)
        return arrays

    def close(self) -> None:
        """Drops the reader's mappings (tensors already returned keep theirs)."""
        self._open.clear()

    def __enter__(self) -> TopKReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- reading ---

    @property
    def num_batches(self) -> int:
        return len(self.batch_shapes)

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, key) -> TopKTeacher:
        if isinstance(key, bool):
            raise TypeError("a row index must be an int, a slice or a 1-D integer index")
        if isinstance(key, slice):
            start, stop, step = key.indices(self.num_rows)
            if step == 1:
                return self._range(start, max(start, stop))
            return self._gather(np.arange(start, stop, step, dtype=np.int64))
        if isinstance(key, (int, np.integer)) or (
            isinstance(key, Tensor) and key.dim() == 0 and not key.is_floating_point()
        ):
            i = int(key)
            if not -self.num_rows <= i < self.num_rows:
                raise IndexError(f"row {i} is out of range for {self.num_rows} rows")
            i %= self.num_rows
            one = self._range(i, i + 1)
            return TopKTeacher(one.token_ids[0], one.logprobs[0])
        index = key.cpu().numpy() if isinstance(key, Tensor) else np.asarray(key)
        if index.ndim != 1 or not (np.issubdtype(index.dtype, np.integer) or index.size == 0):
            raise TypeError(
                "a row index must be an int, a slice or a 1-D integer tensor, array or list"
            )
        return self._gather(index.astype(np.int64))

    def batch(self, j: int) -> TopKTeacher:
        """The j-th written batch, in its shape (..., K)."""
        if isinstance(j, bool) or not isinstance(j, (int, np.integer)):
            raise TypeError(f"a batch index must be an int, got {type(j).__name__}")
        if not -self.num_batches <= j < self.num_batches:
            raise IndexError(f"batch {j} is out of range for {self.num_batches} batches")
        j = int(j) % self.num_batches
        rows = self._range(self._batch_starts[j], self._batch_starts[j + 1])
        shape = (*self.batch_shapes[j], self.k)
        return TopKTeacher(rows.token_ids.view(shape), rows.logprobs.view(shape))

    def iter_batches(self) -> Iterator[TopKTeacher]:
        for j in range(self.num_batches):
            yield self.batch(j)

    def _range(self, start: int, stop: int) -> TopKTeacher:
        """Rows [start, stop) as (n, K): a view within one shard (mmap), else a copy."""
        if self.k is None:
            raise ValueError(f"the top-k cache {self.path!r} is empty")
        first = int(np.searchsorted(self._shard_starts, start, side="right")) - 1
        parts = []
        i = max(first, 0)
        while i < len(self._shards) and (self._shard_starts[i] < stop or not parts):
            a = max(start, int(self._shard_starts[i])) - int(self._shard_starts[i])
            b = min(stop, int(self._shard_starts[i + 1])) - int(self._shard_starts[i])
            ids, lps = self._arrays(i)
            parts.append((ids[a : max(a, b)], lps[a : max(a, b)]))
            i += 1
        if not parts:
            parts = [(np.empty((0, self.k), np.int32), np.empty((0, self.k), self._lps_np))]
        if len(parts) == 1:
            ids, lps = parts[0]
            if not self.mmap:
                ids, lps = np.array(ids), np.array(lps)
        else:
            ids = np.concatenate([p[0] for p in parts])
            lps = np.concatenate([p[1] for p in parts])
        return self._teacher(ids, lps)

    def _gather(self, index: np.ndarray) -> TopKTeacher:
        """The rows ``index`` (any order, repeats allowed), copied."""
        if self.k is None:
            raise ValueError(f"the top-k cache {self.path!r} is empty")
        n = self.num_rows
        if index.size and (index.min() < -n or index.max() >= n):
            raise IndexError(f"a row index is out of range for {n} rows")
        index = np.where(index < 0, index + n, index)
        ids = np.empty((index.size, self.k), np.int32)
        lps = np.empty((index.size, self.k), self._lps_np)
        shard_of = np.searchsorted(self._shard_starts, index, side="right") - 1
        for i in np.unique(shard_of):
            sel = shard_of == i
            local = index[sel] - self._shard_starts[i]
            s_ids, s_lps = self._arrays(int(i))
            ids[sel], lps[sel] = s_ids[local], s_lps[local]
        return self._teacher(ids, lps)

    def _teacher(self, ids: np.ndarray, lps: np.ndarray) -> TopKTeacher:
        ids_t = torch.from_numpy(ids)
        lps_t = torch.from_numpy(lps)
        if self.logprobs_dtype == torch.bfloat16:
            lps_t = lps_t.view(torch.bfloat16)
        if self.device is not None:
            ids_t, lps_t = ids_t.to(self.device), lps_t.to(self.device)
        return TopKTeacher(ids_t, lps_t)
