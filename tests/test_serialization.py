"""to_dict / from_dict, save / load, pickling."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from streamnorm import Moments, moments


def _states():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 3, 4)) + 1e6
    yield moments(x, (0, 2))
    yield moments(x[:, 0, 0])  # scalar-shaped
    yield moments(x, (0, 2), weights=rng.random(50))
    xb = x.copy()
    xb[0, 1, 1] = np.nan
    yield moments(xb, (0, 2), nan_policy="omit")
    yield Moments()


def _same(a: Moments, b: Moments):
    da, db = a.to_dict(), b.to_dict()
    assert da.keys() == db.keys()
    for k in da:
        np.testing.assert_array_equal(da[k], db[k])
    assert repr(a) == repr(b)


@pytest.mark.parametrize("m", list(_states()), ids=["plain", "scalar", "weighted", "omit", "empty"])
def test_round_trips(m, tmp_path):
    _same(Moments.from_dict(m.to_dict()), m)
    path = tmp_path / "m.npz"
    m.save(path)
    _same(Moments.load(path), m)
    _same(pickle.loads(pickle.dumps(m)), m)
    assert [p.name for p in tmp_path.iterdir()] == ["m.npz"]  # no temp files left


def test_loaded_state_keeps_merging_exactly(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4000, 2)) + 1e8
    a = moments(x[:1000])
    a.save(tmp_path / "a.npz")
    b = Moments.load(tmp_path / "a.npz").update(x[1000:])
    np.testing.assert_array_equal(b.var(), a.update(x[1000:]).var())


def test_truncated_file(tmp_path):
    path = tmp_path / "m.npz"
    moments(np.ones((3, 2))).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable streamnorm Moments file"):
        Moments.load(path)


def test_foreign_files(tmp_path):
    other = tmp_path / "other.npz"
    np.savez(other, a=np.ones(3))
    with pytest.raises(ValueError, match="missing"):
        Moments.load(other)
    text = tmp_path / "x.npz"
    text.write_text("hello")
    with pytest.raises(ValueError, match="not a readable"):
        Moments.load(text)
    with pytest.raises(FileNotFoundError):
        Moments.load(tmp_path / "missing.npz")


def test_bad_records():
    d = moments(np.ones((3, 2))).to_dict()
    with pytest.raises(ValueError, match="version"):
        Moments.from_dict({**d, "version": 99})
    with pytest.raises(ValueError, match="format"):
        Moments.from_dict({**d, "format": "something else"})
    with pytest.raises(ValueError, match="shape"):
        Moments.from_dict({**d, "mean": np.ones(5)})
    with pytest.raises(ValueError, match="negative"):
        Moments.from_dict({**d, "count": -np.ones(2)})
    with pytest.raises(TypeError):
        Moments.from_dict([1, 2])


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "m.npz"
    moments(np.ones((3, 2))).save(path)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        moments(np.zeros((3, 2))).save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.npz"]


def test_from_arrays():
    m = Moments.from_arrays(10, [1.0, 2.0], [9.0, 18.0])
    assert m.count == 10
    np.testing.assert_allclose(m.var(ddof=1), [1.0, 2.0])
    p = Moments.from_arrays([3, 4], [0.0, 0.0], [1.0, 1.0])
    np.testing.assert_array_equal(p.count, [3, 4])
    with pytest.raises(ValueError, match="shape"):
        Moments.from_arrays(1, [0.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="non-negative"):
        Moments.from_arrays(-1, [0.0], [1.0])
