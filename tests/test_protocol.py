"""One protocol, checked on every estimator the library registers (River's ``A + B == stream``).

The classes come from ``Estimator``'s registry, so a new estimator is tested here as soon as
``streamnorm.estimators`` imports it. It is built with its defaults; an estimator that takes a
``source`` (BN buffers to adapt from) gets one of the stream's dimension shape; ``VARIANTS`` adds
non-default parameters for the classes whose options change the arithmetic.

Checked for each: ``update`` returns ``self`` (an empty batch changes nothing); a stream split
anywhere (two parts, interleaved, three parts in either grouping) and merged equals the whole
stream to 1e-12, and keeps equalling it after more batches, where the estimator merges, and
``merge``/``+`` raise ``TypeError`` where it does not; ``to_dict``/``from_dict`` (also through
``.npz``, ``pickle`` and ``copy``) give back the same state; ``var`` is ``running_var`` of
``var_convention``, and the two conventions differ by one Bessel factor ``(m - 1) / m``;
``reset`` gives back a fresh estimator; copies are independent.
"""

from __future__ import annotations

import copy
import inspect
import io
import pickle
from typing import Any

import numpy as np
import pytest

from streamnorm import Moments, Tracker, moments
from streamnorm import estimators as E
from streamnorm._errors import RecordError

RTOL = 1e-12
DIMS = (2, 3)  # the dimension shape of every batch below: (rows, 2, 3) reduced over axis 0
SOURCE = (np.linspace(-1.0, 4.0, 6).reshape(DIMS), np.linspace(0.5, 3.0, 6).reshape(DIMS))


def _classes() -> list[type[E.Estimator]]:
    found = [
        c
        for c in E.Estimator._registry.values()
        if c.__module__.startswith("streamnorm.") and not inspect.isabstract(c)
    ]
    return sorted(found, key=lambda c: c.__name__)


CLASSES = _classes()

#: Extra parameter sets (beyond the defaults) for options that change the arithmetic.
VARIANTS: dict[str, list[dict[str, Any]]] = {
    "EMA": [
        {"momentum": 0.9, "style": "keras", "unbiased": False, "bias_correction": True},
        {"momentum": 1.0},
    ],
    "CumulativeAverage": [{"unbiased": False, "var_mode": "pooled"}, {"var_mode": "pooled"}],
    "WindowedAverage": [
        {"drop_first": 0, "drop_last": 0, "unbiased": False},
        {"drop_first": 1, "drop_last": 0.2, "var_mode": "mean_of_batch"},
    ],
}


def _cases() -> list[Any]:
    out = []
    for cls in CLASSES:
        for i, params in enumerate([{}, *VARIANTS.get(cls.__name__, [])]):
            out.append(pytest.param(cls, params, id=f"{cls.__name__}-{i}"))
    return out


CASES = _cases()


def build(cls: type[E.Estimator], params: dict[str, Any]) -> E.Estimator:
    """A fresh estimator; one taking BN source statistics gets ``SOURCE``."""
    kw = dict(params)
    if "source" in inspect.signature(cls).parameters and "source" not in kw:
        kw["source"] = SOURCE
    return cls(**kw)


# --------------------------------------------------------------------------------------------
# streams of batches: (Moments, epoch) pairs


def _stream(kind: str, seed: int = 0) -> list[tuple[Moments, int]]:
    rng = np.random.default_rng(seed)
    rows = [16, 9, 16, 5, 12, 16, 7, 16, 20, 11]
    epochs = [0, 0, 1, 1, 1, 2, 3, 3, 4, 5]
    out = []
    for b, (r, ep) in enumerate(zip(rows, epochs, strict=True)):
        loc = 3.0 + 0.2 * b + np.arange(6.0).reshape(DIMS)
        x = rng.normal(loc, rng.uniform(0.5, 3.0), size=(r, *DIMS))
        if kind == "omit":  # per-dimension counts; every dimension keeps >= 2 values a batch
            x[2:][rng.random((r - 2, *DIMS)) < 0.3] = np.nan
            out.append((moments(x, 0, nan_policy="omit"), ep))
        elif kind == "weighted":
            out.append((moments(x, 0, weights=rng.uniform(0.5, 2.0, r)), ep))
        else:
            out.append((moments(x, 0), ep))
    return out


STREAMS = ["plain", "omit", "weighted"]


def feed(est: E.Estimator, batches: list[tuple[Moments, int]]) -> E.Estimator:
    for m, ep in batches:
        assert est.update(m, epoch=ep) is est
    return est


def readings(est: E.Estimator) -> dict[str, Any]:
    """What a user reads; a reading that raises ``ValueError`` is recorded as such."""
    out: dict[str, Any] = {"shape": est.shape, "batches": est.batches}
    out["count"] = np.asarray(est.count, dtype=np.float64)
    getters = {
        "mean": lambda: est.mean,
        "var": lambda: est.var,
        "biased": lambda: est.running_var("biased"),
        "unbiased": lambda: est.running_var("unbiased"),
    }
    for key, get in getters.items():
        try:
            out[key] = np.asarray(get(), dtype=np.float64)
        except ValueError:
            out[key] = "ValueError"
    return out


def assert_same(got: dict[str, Any], ref: dict[str, Any], rtol: float = RTOL) -> None:
    assert got["shape"] == ref["shape"] and got["batches"] == ref["batches"]
    np.testing.assert_allclose(got["count"], ref["count"], rtol=rtol)
    for key in ("mean", "var", "biased", "unbiased"):
        g, r = got[key], ref[key]
        if isinstance(r, str) or isinstance(g, str):
            assert isinstance(g, str) and isinstance(r, str), (key, g, r)
            continue
        scale = float(np.nanmax(np.abs(r))) if np.isfinite(r).any() else 1.0
        np.testing.assert_allclose(g, r, rtol=rtol, atol=rtol * scale, err_msg=key)


def assert_records_equal(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def merges(cls: type[E.Estimator], params: dict[str, Any]) -> bool:
    """Whether the estimator merges: two fresh ones merge, or ``merge`` raises ``TypeError``."""
    try:
        build(cls, params).merge(build(cls, params))
    except TypeError:
        return False
    return True


# --------------------------------------------------------------------------------------------


def test_every_public_estimator_is_registered():
    public = {n for n in E.__all__ if isinstance(getattr(E, n), type) and n not in {"Estimator"}}
    public = {n for n in public if issubclass(getattr(E, n), E.Estimator)}
    assert public and public <= {c.__name__ for c in CLASSES}


@pytest.mark.parametrize("cls, params", CASES)
def test_update_returns_self_and_empty_batches_change_nothing(cls, params):
    est = build(cls, params)
    before = est.to_dict()
    assert est.update(Moments()) is est
    assert_records_equal(est.to_dict(), before)
    feed(est, _stream("plain")[:3])
    before = est.to_dict()
    assert est.update(Moments(), epoch=1) is est
    assert_records_equal(est.to_dict(), before)
    assert est.batches == 3


@pytest.mark.parametrize("kind", STREAMS)
@pytest.mark.parametrize("cls, params", CASES)
def test_split_streams_merged_equal_one_stream(cls, params, kind):
    batches = _stream(kind, seed=1)
    fresh = lambda: build(cls, params)  # noqa: E731
    if not merges(cls, params):
        a, b = feed(fresh(), batches[:4]), feed(fresh(), batches[4:])
        with pytest.raises(TypeError):
            a.merge(b)
        with pytest.raises(TypeError):
            _ = a + b
        return
    whole = feed(fresh(), batches)
    ref = readings(whole)
    for cut in range(len(batches) + 1):
        a, b = feed(fresh(), batches[:cut]), feed(fresh(), batches[cut:])
        rec_a, rec_b = a.to_dict(), b.to_dict()
        assert_same(readings(a.merge(b)), ref)
        assert_same(readings(a + b), ref)
        assert_records_equal(a.to_dict(), rec_a)  # the inputs do not change
        assert_records_equal(b.to_dict(), rec_b)
    # two workers that saw alternate batches of the same epochs
    merged = feed(fresh(), batches[0::2]).merge(feed(fresh(), batches[1::2]))
    assert_same(readings(merged), ref)
    # three parts, grouped either way
    p, q, r = batches[:3], batches[3:7], batches[7:]
    left = (feed(fresh(), p) + feed(fresh(), q)) + feed(fresh(), r)
    right = feed(fresh(), p) + (feed(fresh(), q) + feed(fresh(), r))
    assert_same(readings(left), ref)
    assert_same(readings(right), ref)
    # a merged estimator goes on like the whole stream
    more = _stream(kind, seed=2)[-2:]
    more = [(m, batches[-1][1] + i) for i, (m, _) in enumerate(more)]
    assert_same(readings(feed(merged, more)), readings(feed(whole, more)))


@pytest.mark.parametrize("kind", STREAMS)
@pytest.mark.parametrize("cls, params", CASES)
def test_to_dict_from_dict_round_trip(cls, params, kind):
    est = feed(build(cls, params), _stream(kind, seed=3))
    rec = est.to_dict()
    ref = readings(est)
    buf = io.BytesIO()
    np.savez(buf, **rec)
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as z:
        from_npz = E.from_dict({k: z[k] for k in z.files})
    clones = [
        E.from_dict(rec),
        cls.from_dict(rec),
        from_npz,
        pickle.loads(pickle.dumps(est)),
        copy.deepcopy(est),
        copy.copy(est),
        est.copy(),
    ]
    for clone in clones:
        assert type(clone) is cls and repr(clone) == repr(est)
        assert_records_equal(clone.to_dict(), rec)
        assert_same(readings(clone), ref, rtol=0)
    # and they go on exactly like the original
    more = [(moments(np.full((4, *DIMS), 2.5) + np.arange(4.0)[:, None, None]), 9)]
    ref_more = readings(feed(est, more))
    for clone in clones:
        assert_same(readings(feed(clone, more)), ref_more, rtol=0)
    fresh = build(cls, params)
    assert_records_equal(E.from_dict(fresh.to_dict()).to_dict(), fresh.to_dict())


@pytest.mark.parametrize("cls, params", CASES)
def test_running_var_conventions(cls, params):
    """``var`` is ``running_var(var_convention)``; biased = unbiased (m - 1) / m for one m.

    The batches all have 16 rows. The part of each variance that comes from the spread inside
    the batches is isolated by feeding a twin stream with the same counts and means and no spread
    (start values, source statistics and the scatter of the batch means cancel). Its biased and
    unbiased versions must differ by Bessel's factor ``(m - 1) / m``, with the same ``m`` in every
    dimension, ``m`` a whole number of batches: 16 for averages of batch variances, the samples
    pooled for pooled ones (all of them, or those of the epochs kept).
    """
    rng = np.random.default_rng(4)
    epochs = [0, 0, 1, 1, 2, 2, 3, 3]
    real, flat = [], []
    for b, ep in enumerate(epochs):
        x = rng.normal(2.0 + b + np.arange(6.0).reshape(DIMS), 1.0 + 0.3 * b, size=(16, *DIMS))
        m = moments(x, 0)
        real.append((m, ep))
        flat.append((Moments.from_arrays(np.full(DIMS, 16.0), m.mean, np.zeros(DIMS)), ep))
    est = feed(build(cls, params), real)
    twin = feed(build(cls, params), flat)
    assert est.var_convention in E.CONVENTIONS
    np.testing.assert_array_equal(est.var, est.running_var(est.var_convention))
    d_biased = np.asarray(est.running_var("biased")) - np.asarray(twin.running_var("biased"))
    d_unbiased = np.asarray(est.running_var("unbiased")) - np.asarray(twin.running_var("unbiased"))
    assert np.all(d_unbiased > 0), d_unbiased
    m = 1.0 / (1.0 - d_biased / d_unbiased)
    np.testing.assert_allclose(m, m.flat[0], rtol=1e-8)
    batches = m.flat[0] / 16
    assert batches >= 1 - 1e-8 and abs(batches - round(batches)) < 1e-6, m.flat[0]
    with pytest.raises(ValueError, match="convention"):
        est.running_var("ddof1")


@pytest.mark.parametrize("cls, params", CASES)
def test_reset_gives_back_a_fresh_estimator(cls, params):
    batches = _stream("omit", seed=5)
    est = feed(build(cls, params), batches)
    assert est.reset() is est
    assert_records_equal(est.to_dict(), build(cls, params).to_dict())
    assert est.batches == 0
    again = feed(est, batches[:5])
    assert_same(readings(again), readings(feed(build(cls, params), batches[:5])), rtol=0)


@pytest.mark.parametrize("cls, params", CASES)
def test_copies_are_independent(cls, params):
    batches = _stream("plain", seed=6)
    est = feed(build(cls, params), batches[:6])
    for clone in (est.copy(), copy.deepcopy(est), copy.copy(est)):
        snapshot = est.to_dict()
        feed(clone, batches[6:])
        assert_records_equal(est.to_dict(), snapshot)
        mark = clone.to_dict()
        feed(est, batches[6:8])
        assert_records_equal(clone.to_dict(), mark)
        est = feed(build(cls, params), batches[:6])


# --------------------------------------------------------------------------------------------
# damaged records: every field is checked for type, finiteness and range


#: state entries that are counts (or sums of squares): negative values are impossible
NON_NEGATIVE = {"count", "n", "m2", "t", "batches", "pooled_sum", "epochs", "epoch_batches"}
NON_NEGATIVE |= {"epoch_count", "epoch_m2"}
#: state entries that count batches or steps: whole numbers
WHOLE = {"t", "batches", "epochs", "epoch_batches"}


def _damaged(rec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``(what, record)`` pairs: ``rec`` with one field damaged each."""
    out: list[tuple[str, dict[str, Any]]] = []

    def put(what: str, key: str, value: Any) -> None:
        out.append((what, {**rec, key: value}))

    for v in (1.5, True, [1], "1", np.float64(1.0)):
        put(f"version {v!r}", "version", v)
    for v in (-1, 1.5, True, np.inf):
        put(f"batches {v!r}", "batches", v)
    for key in ("empty", "weighted", "uniform"):
        put(f"{key} 'no'", key, "no")
        put(f"{key} 1", key, 1)
    put("estimator 7", "estimator", 7)
    put("shape 1.5", "shape", np.asarray(rec["shape"], dtype=np.float64) + 0.5)
    put("unknown param", "param_bogus", 1.0)
    for key in (k for k in rec if k.startswith("param_")):
        put(f"{key} 'bogus'", key, "bogus")
    for key in ("count", *(k for k in rec if k.startswith("state_"))):
        a = np.asarray(rec[key])
        if a.dtype.kind not in "iuf":
            continue
        name = key.removeprefix("state_")
        bad = [np.inf, -np.inf]
        if "unbiased" not in name.split("_"):  # an unbiased variance may be NaN (one value)
            bad.append(np.nan)
        if name in NON_NEGATIVE or "var" in name.split("_"):
            bad.append(-1.0)
        if name in WHOLE:
            bad.append(0.5)
        for v in bad:
            b = a.astype(np.float64, copy=True)
            b.reshape(-1)[0] = v
            put(f"{key}[0] = {v}", key, b)
        put(f"{key} as text", key, a.astype(str))
    return out


@pytest.mark.parametrize("cls, params", CASES)
def test_damaged_records_raise_record_error(cls, params):
    """Every damaged field raises ``RecordError``, through ``from_dict`` and ``Tracker``."""
    est = feed(build(cls, params), _stream("plain", seed=7)[:4])
    rec = est.to_dict()
    cases = _damaged(rec)
    assert len(cases) > 20
    for what, bad in cases:
        with pytest.raises(RecordError):
            E.from_dict(bad)
            pytest.fail(f"{cls.__name__}: a record with {what} was accepted")
    # through a Tracker record (what Tracker.load reads)
    tr = Tracker({"e": build(cls, params)})
    for m, _ in _stream("plain", seed=7)[:4]:
        tr.update_moments("layer", m)
    trec = tr.to_dict()
    prefix = "layer.0.0."
    for what, bad in cases:
        damaged = {**trec, **{prefix + k: v for k, v in bad.items()}}
        if what == "unknown param":
            damaged[prefix + "param_bogus"] = 1.0
        with pytest.raises(RecordError):
            Tracker.from_dict(damaged)
            pytest.fail(f"{cls.__name__}: a Tracker record with {what} was accepted")
    for v in (True, -1, 1.5):
        with pytest.raises(RecordError):
            Tracker.from_dict({**trec, "epoch": v})
