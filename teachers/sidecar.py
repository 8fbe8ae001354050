"""Label sidecars: one `.npz` of teacher logits per unlabeled shard, rows keyed by `__key__`.

Logits, never probabilities, so any temperature or hard labels can be derived later.
Layout (format 1, `np.savez`, uncompressed):

    format        ()      int      1
    keys          (N,)    unicode  webdataset `__key__` of each row
    num_classes   ()      int      C
    meta          ()      unicode  JSON of the caller's dict (teacher hash, source shard sha256, counts, ...)
    shift         (N,)    float32  row maximum of the fp32 logits
    full layout:  logits      (N,C) float16  fp32 logits - shift
    top-k layout: topk_index  (N,k) int32    classes by descending logit (ties: lower class id first)
                  topk_logits (N,k) float16  fp32 logits - shift, same order
                  lse         (N,)  float32  logsumexp of the full fp32 row (absolute, not shifted)

Why `shift`: fp16 keeps 11 significant bits, so a raw logit of 20 is stored to +-0.008, which
moves probabilities by ~1%. Relative to the row maximum the classes that carry the mass sit
near 0, where fp16 is fine, and softmax at any temperature is unchanged by a per-row shift.
`Sidecar.full_logits()` adds it back.

Top-k soft labels at T != 1 are an approximation; see `_topk_log_weights`.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.atomic import atomic_open
from pipeline.core.metrics import softmax_np

FORMAT = 1
_FP16_MIN = float(np.finfo(np.float16).min)


class SidecarError(ValueError):
    """A sidecar is missing, unreadable or inconsistent; the message names the file."""


@dataclass(frozen=True)
class Sidecar:
    """One shard's labels as stored (arrays in their on-disk dtypes)."""

    path: Path
    keys: np.ndarray
    num_classes: int
    meta: dict
    shift: np.ndarray
    logits: np.ndarray | None = None
    topk_index: np.ndarray | None = None
    topk_logits: np.ndarray | None = None
    lse: np.ndarray | None = None

    @property
    def is_topk(self) -> bool:
        return self.topk_index is not None

    def __len__(self) -> int:
        return len(self.keys)

    def full_logits(self) -> np.ndarray:
        """(N,C) float32 logits in the teacher's own frame (full layout only)."""
        if self.logits is None:
            raise SidecarError(f"{self.path}: top-k sidecar has no full logits")
        return self.logits.astype(np.float32) + self.shift[:, None]


def _logsumexp(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]


def _topk(z: np.ndarray, k: int) -> np.ndarray:
    """(N,k) indices of the k largest per row, by descending value then ascending class id."""
    idx = np.argpartition(-z, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(z, idx, axis=1)
    order = np.lexsort((idx, -vals), axis=1)
    return np.take_along_axis(idx, order, axis=1).astype(np.int32)


def write_sidecar(path: Path, keys: list[str], logits: np.ndarray, meta: dict[str, Any],
                  topk: int | None = None) -> None:
    """Atomically write the sidecar for one shard; top-k layout when 1 <= topk < C."""
    path = Path(path)
    z = np.asarray(logits, dtype=np.float32)
    if z.ndim != 2 or z.shape[1] < 1:
        raise ValueError(f"{path}: logits must be (N, C) with C >= 1, got shape {z.shape}")
    n, c = z.shape
    if len(keys) != n:
        raise ValueError(f"{path}: {len(keys)} keys for {n} logit rows")
    key_arr = np.asarray(list(keys), dtype=str)
    if n and len(np.unique(key_arr)) != n:
        uniq, counts = np.unique(key_arr, return_counts=True)
        raise ValueError(f"{path}: duplicate __key__ {str(uniq[counts > 1][0])!r}")
    if not np.isfinite(z).all():
        row = int(np.argwhere(~np.isfinite(z))[0, 0])
        raise ValueError(f"{path}: non-finite logits for key {str(key_arr[row])!r}")
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, (int, np.integer)) or topk < 1):
        raise ValueError(f"{path}: topk must be None or an integer >= 1, got {topk!r}")
    try:
        meta_json = json.dumps(meta, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: meta is not JSON-serialisable ({exc})") from None

    shift = z.max(axis=1) if n else np.zeros(0, np.float32)
    rel = np.clip(z - shift[:, None], _FP16_MIN, 0.0)
    arrays: dict[str, np.ndarray] = {"format": np.array(FORMAT), "keys": key_arr, "num_classes": np.array(c),
                                     "meta": np.array(meta_json), "shift": shift.astype(np.float32)}
    if topk is None or topk >= c:
        arrays["logits"] = rel.astype(np.float16)
    else:
        idx = _topk(z, int(topk)) if n else np.zeros((0, int(topk)), np.int32)
        arrays["topk_index"] = idx
        arrays["topk_logits"] = np.take_along_axis(rel, idx, axis=1).astype(np.float16)
        arrays["lse"] = _logsumexp(z.astype(np.float64)).astype(np.float32) if n else np.zeros(0, np.float32)
    with atomic_open(path) as handle:
        np.savez(handle, **arrays)


def _open(path: Path) -> np.lib.npyio.NpzFile:
    if not path.is_file():
        raise SidecarError(f"{path}: sidecar not found")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise SidecarError(f"{path}: corrupt sidecar ({exc})") from None


def _field(npz: np.lib.npyio.NpzFile, path: Path, name: str) -> np.ndarray:
    if name not in npz.files:
        raise SidecarError(f"{path}: corrupt sidecar (missing field '{name}')")
    try:
        return npz[name]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as exc:
        raise SidecarError(f"{path}: corrupt sidecar (field '{name}': {exc})") from None


def _meta(npz: np.lib.npyio.NpzFile, path: Path) -> dict:
    try:
        meta = json.loads(str(_field(npz, path, "meta")))
    except json.JSONDecodeError as exc:
        raise SidecarError(f"{path}: corrupt sidecar (field 'meta' is not JSON: {exc})") from None
    if not isinstance(meta, dict):
        raise SidecarError(f"{path}: corrupt sidecar (field 'meta' is not a JSON object)")
    return meta


def read_sidecar_meta(path: Path) -> dict:
    """Only the `meta` dict: reads the zip directory and one small member (for resume checks)."""
    path = Path(path)
    with _open(path) as npz:
        return _meta(npz, path)


def _check(ok: bool, path: Path, what: str) -> None:
    if not ok:
        raise SidecarError(f"{path}: corrupt sidecar ({what})")


def read_sidecar(path: Path) -> Sidecar:
    """Load and validate a sidecar; any problem raises `SidecarError` naming the path."""
    path = Path(path)
    with _open(path) as npz:
        fmt = _field(npz, path, "format")
        _check(fmt.shape == () and int(fmt) == FORMAT, path, f"format {fmt!r}, expected {FORMAT}")
        keys = _field(npz, path, "keys")
        c = _field(npz, path, "num_classes")
        shift = _field(npz, path, "shift")
        meta = _meta(npz, path)
        _check(keys.ndim == 1 and keys.dtype.kind == "U", path, "field 'keys' is not a 1-d string array")
        _check(c.shape == () and c.dtype.kind in "iu" and int(c) >= 1, path, "bad field 'num_classes'")
        n, c = len(keys), int(c)
        _check(shift.shape == (n,), path, f"field 'shift' has shape {shift.shape}, expected ({n},)")
        if "logits" in npz.files:
            logits = _field(npz, path, "logits")
            _check(logits.shape == (n, c) and logits.dtype == np.float16, path,
                   f"field 'logits' is {logits.dtype}{logits.shape}, expected float16({n}, {c})")
            return Sidecar(path, keys, c, meta, shift, logits=logits)
        idx, vals, lse = (_field(npz, path, f) for f in ("topk_index", "topk_logits", "lse"))
        _check(idx.ndim == 2 and idx.shape[0] == n and 1 <= idx.shape[1] < c and idx.dtype.kind in "iu",
               path, f"field 'topk_index' has shape {idx.shape} for {n} rows and {c} classes")
        _check(vals.shape == idx.shape and vals.dtype == np.float16, path, "field 'topk_logits' does not match 'topk_index'")
        _check(lse.shape == (n,), path, f"field 'lse' has shape {lse.shape}, expected ({n},)")
        _check(idx.size == 0 or (idx.min() >= 0 and idx.max() < c), path, "field 'topk_index' out of class range")
        return Sidecar(path, keys, c, meta, shift, topk_index=idx.astype(np.int32), topk_logits=vals, lse=lse)


def _check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not (np.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return t


def _topk_log_weights(sc: Sidecar, temperature: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unnormalised log-weights at T of the kept classes (N,k), of each tail class (N,), and log Z (N,).

    The stored data fix the T=1 distribution on the kept classes, p_i = exp(z_i - lse), and the
    tail mass R = 1 - sum p_i, but not how R splits over the C-k other classes. Model: the tail is
    C-k classes of one common logit t = lse + log(R / (C-k)), so T=1 is exact and a truly uniform
    tail is exact at every T. At T != 1 every logit is divided by T. By Jensen this overestimates
    the tail mass for T > 1 (a real tail is uneven) and underestimates it for T < 1; the error
    vanishes with R. Measured (tests/test_sidecar.py, C=100, k=10, R ~ 1e-3): < 1e-3 per class at
    T=0.5, < 1e-2 at T=2. R <= 0 (fp16 rounding) means an empty tail.
    """
    k = sc.topk_index.shape[1]
    tail_n = sc.num_classes - k
    a = sc.topk_logits.astype(np.float64)                     # relative to the row max
    big_l = sc.lse.astype(np.float64) - sc.shift.astype(np.float64)
    mass = np.exp(a - big_l[:, None]).sum(axis=1)
    resid = 1.0 - mass
    with np.errstate(divide="ignore"):
        t = np.where(resid > 0, big_l + np.log(np.maximum(resid, 0.0) / tail_n), -np.inf)
    kept = a / temperature
    tail = t / temperature
    top = kept.max(axis=1)
    with np.errstate(divide="ignore"):
        log_z = top + np.log(np.exp(kept - top[:, None]).sum(axis=1) + tail_n * np.exp(tail - top))
    return kept, tail, log_z


def soft_labels(sc: Sidecar, temperature: float = 1.0) -> np.ndarray:
    """(N,C) float32 softmax(logits / T); for top-k sidecars see `_topk_log_weights`."""
    t = _check_temperature(temperature)
    if not sc.is_topk:
        return softmax_np(sc.logits, t).astype(np.float32) if len(sc) else np.zeros((0, sc.num_classes), np.float32)
    kept, tail, log_z = _topk_log_weights(sc, t)
    out = np.repeat(np.exp(tail - log_z)[:, None], sc.num_classes, axis=1)
    np.put_along_axis(out, sc.topk_index, np.exp(kept - log_z[:, None]), axis=1)
    return out.astype(np.float32)


def hard_labels(sc: Sidecar, smoothing: float = 0.0) -> np.ndarray:
    """(N,C) float32 one-hot of the argmax, smoothed as torch CE does: (1-eps)*onehot + eps/C."""
    eps = float(smoothing)
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"label smoothing must be in [0, 1), got {smoothing!r}")
    pred = sc.topk_index[:, 0] if sc.is_topk else sc.logits.argmax(axis=1)
    out = np.full((len(sc), sc.num_classes), eps / sc.num_classes, dtype=np.float32)
    out[np.arange(len(sc)), pred] += 1.0 - eps
    return out


def confidence_and_prediction(sc: Sidecar, temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 probability (float32) and argmax class (int64) per row; never builds (N,C) for top-k."""
    t = _check_temperature(temperature)
    if not sc.is_topk:
        z = sc.logits.astype(np.float32)
        pred = z.argmax(axis=1)
        top = np.take_along_axis(z, pred[:, None], axis=1)
        conf = 1.0 / np.exp((z - top) / t).sum(axis=1, dtype=np.float64)
        return conf.astype(np.float32), pred.astype(np.int64)
    kept, _, log_z = _topk_log_weights(sc, t)
    return np.exp(kept[:, 0] - log_z).astype(np.float32), sc.topk_index[:, 0].astype(np.int64)
