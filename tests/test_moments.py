"""Kernels against the long-double oracle over layouts, dtypes and strides."""

from __future__ import annotations

import numpy as np
import pytest
from naive import moments_ld

import streamnorm as sn
from streamnorm import Moments, moments

DTYPES = "float16 float32 float64 int8 int16 int32 int64 uint8 uint16 uint32 uint64 bool".split()


def make(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    if dt.kind == "b":
        return rng.random(shape) < 0.3
    if dt.kind in "iu":
        info = np.iinfo(dt)
        lo, hi = max(info.min, -1000), min(info.max, 1000)
        return rng.integers(lo, hi, size=shape, endpoint=True).astype(dt)
    return (rng.standard_normal(shape) * 3 + 1).astype(dt)


def check(x, axis, *, rtol=1e-12, weights=None, nan_policy="propagate"):
    m = moments(x, axis, weights=weights, nan_policy=nan_policy)
    n, mu, m2 = moments_ld(x, axis, weights=weights, omit=nan_policy == "omit")
    mean = np.asarray(m.mean, dtype=np.float64)
    var = np.asarray(m.var(), dtype=np.float64)
    assert mean.shape == mu.shape
    np.testing.assert_allclose(mean, mu.astype(np.float64), rtol=rtol, atol=1e-13)
    with np.errstate(invalid="ignore", divide="ignore"):
        ref_var = (m2 / n).astype(np.float64)
    np.testing.assert_allclose(var, ref_var, rtol=rtol, atol=1e-13)
    cnt = np.asarray(m.count, dtype=np.float64)
    np.testing.assert_allclose(np.broadcast_to(cnt, n.shape), n.astype(np.float64), rtol=1e-15)
    return m


LAYOUTS = [
    ("rows", (300, 17), 0),
    ("rows-wide", (40, 1030), 0),
    ("rows-neg-axis", (300, 17), -2),
    ("nchw", (6, 5, 7, 9), (0, 2, 3)),
    ("ncl", (7, 4, 33), (0, 2)),
    ("ncdhw", (3, 4, 5, 2, 6), (0, 2, 3, 4)),
    ("nhwc", (6, 7, 9, 5), (0, 1, 2)),
    ("per-sample", (6, 5, 7, 9), (2, 3)),
    ("layer-norm", (6, 5, 7, 9), (1, 2, 3)),
    ("1d", (1001,), 0),
    ("all-axes", (6, 5, 7), None),
    ("middle", (6, 5, 7), 1),
    ("two-kept", (6, 5, 7, 3), (0, 2)),
    ("no-reduction", (4, 3), ()),
]


@pytest.mark.parametrize("name,shape,axis", LAYOUTS, ids=[lay[0] for lay in LAYOUTS])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_layouts(name, shape, axis, dtype):
    check(make(shape, dtype), axis)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "name,shape,axis", [LAYOUTS[0], LAYOUTS[3], LAYOUTS[6]], ids=["rows", "nchw", "nhwc"]
)
def test_dtypes(dtype, name, shape, axis):
    x = make(shape, dtype)
    rtol = 1e-12
    check(x, axis, rtol=rtol)


def _views(x):
    """Views of a 4-D NCHW array: strided, reversed, Fortran, transposed (channels_last)."""
    yield "contiguous", x, (0, 2, 3)
    yield "reversed-N", x[::-1], (0, 2, 3)
    yield "reversed-C", x[:, ::-1], (0, 2, 3)
    yield "strided-W", x[:, :, :, ::3], (0, 2, 3)
    yield "strided-C", x[:, ::2], (0, 2, 3)
    yield "fortran", np.asfortranarray(x), (0, 2, 3)
    nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    yield "channels-last-view", nhwc.transpose(0, 3, 1, 2), (0, 2, 3)
    yield "channels-last-view-per-sample", nhwc.transpose(0, 3, 1, 2), (2, 3)
    yield "nhwc-reversed-H", nhwc[:, ::-1], (0, 1, 2)
    yield "transposed-HW", x.transpose(0, 1, 3, 2), (0, 2, 3)
    yield "broadcast", np.broadcast_to(x[:1], x.shape), (0, 2, 3)


@pytest.mark.parametrize("dtype", ["float32", "float64", "int16", "float16"])
def test_strided_views(dtype):
    x = make((5, 6, 7, 8), dtype, seed=3)
    for name, v, axis in _views(x):
        m = check(v, axis)
        assert m.shape == tuple(s for i, s in enumerate(v.shape) if i not in axis), name


@pytest.mark.parametrize("order", ["C", "F"])
def test_2d_views(order):
    x = np.asarray(make((200, 30), "float32", seed=5), order=order)
    for v in (x, x[:, ::3], x[::-1], x[::-2, 1::2], x.T, x[::7]):
        check(v, 0)
        check(v, 1)


@pytest.mark.parametrize(
    "view",
    [
        lambda x: (x, (0, 2, 3)),
        lambda x: (x[:, ::-1], (0, 2, 3)),
        lambda x: (x.transpose(0, 2, 3, 1), (0, 1, 2)),
    ],
    ids=["contiguous", "reversed-C", "channels-last"],
)
def test_inputs_never_modified_nor_copied_whole(view):
    """A writable input keeps its bits, and no allocation comes near the input's size."""
    import tracemalloc

    x = make((64, 16, 32, 32), "float32")
    x[3, 2, 1, 0] = np.nan
    before = x.copy()
    v, axis = view(x)
    w = np.ones(64)
    calls = [
        lambda: moments(v, axis),
        lambda: moments(v, axis, weights=w, nan_policy="omit"),
        lambda: Moments().update(v, axis),
    ]
    for call in calls:
        call()  # compile outside the measurement
        tracemalloc.start()
        try:
            call()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < x.nbytes // 8, f"{peak} bytes allocated for a {x.nbytes}-byte input"
    np.testing.assert_array_equal(x, before)  # NaN in the same place, every bit the same
    assert x.flags.writeable
    x.flags.writeable = False  # read-only input is accepted as is
    np.testing.assert_array_equal(moments(x, (0, 2, 3)).m2, moments(before, (0, 2, 3)).m2)


def test_list_input():
    m = moments([[1.0, 2.0], [3.0, 5.0]])
    np.testing.assert_array_equal(m.mean, [2.0, 3.5])
    np.testing.assert_array_equal(m.var(ddof=1), [2.0, 4.5])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torch_cpu_tensor_equals_numpy(dtype):
    torch = pytest.importorskip("torch")
    x = make((17, 3, 5, 4), dtype, seed=11) + 100
    t = torch.from_numpy(x)
    for tv, xv, axis in [
        (t, x, (0, 2, 3)),
        (t.permute(0, 2, 3, 1), x.transpose(0, 2, 3, 1), (0, 1, 2)),  # channels-last view
        (t[:, :, ::2], x[:, :, ::2], (0, 2, 3)),
    ]:
        got, ref = moments(tv, axis), moments(xv, axis)
        assert got.count == ref.count == x.shape[0] * xv.shape[axis[1]] * xv.shape[axis[2]]
        np.testing.assert_array_equal(got.mean, ref.mean)
        np.testing.assert_array_equal(got.m2, ref.m2)
        n, mu, m2 = moments_ld(xv, axis)
        np.testing.assert_allclose(got.m2, m2.astype(np.float64), rtol=1e-12)
    assert t.dtype == getattr(torch, dtype)  # the tensor is read as is, not converted
    np.testing.assert_array_equal(t.numpy(), x)


def test_one_d_state_is_scalar():
    m = moments(np.arange(10.0))
    assert m.shape == ()
    assert isinstance(m.mean, np.floating)
    assert m.mean == 4.5
    assert m.count == 10


def test_zero_sample_batch_is_noop():
    m = Moments().update(np.ones((3, 4)))
    before = m.to_dict()
    m.update(np.ones((0, 4)))
    m.update(np.ones((0, 4)), weights=np.ones(0))
    after = m.to_dict()
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])
    assert Moments().update(np.ones((0, 4))).shape is None


def test_count_le_ddof_gives_nan_without_warning():
    m = moments(np.ones((1, 3)))
    with np.errstate(all="raise"):
        assert np.all(np.isnan(m.var(ddof=1)))
        assert np.all(m.var(ddof=0) == 0)


def test_merge_and_update_equal_one_shot():
    x = make((1000, 9), "float64", seed=7)
    a, b = moments(x[:300]), moments(x[300:])
    one = moments(x)
    for m in (a + b, a.merge(b), Moments.merge_all([a, b]), a.copy().__iadd__(b)):
        np.testing.assert_allclose(m.mean, one.mean, rtol=1e-14)
        np.testing.assert_allclose(m.var(), one.var(), rtol=1e-13)
        assert m.count == 1000
    # merge does not touch its inputs
    assert a.count == 300 and b.count == 700
    assert Moments.merge_all([]).shape is None
    assert (Moments() + a).count == 300


def test_read_only_views():
    m = moments(make((10, 3), "float32"))
    with pytest.raises(ValueError):
        m.mean[0] = 1.0
    with pytest.raises(ValueError):
        m.m2[0] = 1.0


def test_update_returns_self_and_constructor():
    x = make((50, 4), "float32")
    m = Moments()
    assert m.update(x) is m
    np.testing.assert_array_equal(Moments(x).mean, m.mean)
    assert "Moments(shape=(4,), count=50)" == repr(m)
    assert repr(Moments()) == "Moments(empty)"


def test_each_call_returns_a_fresh_state():
    x = make((20, 3), "float64", seed=9)
    a, b = moments(x), moments(x)
    assert type(a) is sn.Moments and a is not b
    a.update(x + 5.0)
    assert b.count == 20 and a.count == 40
    np.testing.assert_array_equal(b.mean, moments(x).mean)


def test_stream_fast_path_equals_the_general_path_bit_for_bit():
    """Batches like the last lean one skip the repeated checks; anything else must leave that
    shortcut: other shapes, dtypes, axes, weights, policies, layouts and subclasses."""
    rng = np.random.default_rng(7)
    base = (rng.standard_normal((300, 130)) * 3 + 1e3).astype(np.float32)
    f64 = base.astype(np.float64)
    w = rng.random(300)
    steps = [
        (base, {}),
        (base, {}),  # the shortcut from here on
        (base[:100], {}),  # other rows
        (base, {}),
        (f64, {}),  # other dtype
        (base, {"axis": -2}),
        (base, {"weights": w}),
        (base, {"nan_policy": "omit"}),
        (base, {}),
        (np.asfortranarray(base), {}),
        (base[::-1], {}),
        (np.ma.masked_array(base, mask=base > 1e3 + 5), {}),
        (base, {}),
        (base.astype(">f4"), {}),
        (base, {}),
    ]
    m = Moments()
    ref = Moments()
    for x, kw in steps:
        m.update(x, **kw)
        ref = ref + moments(x, **kw)  # one fresh state a batch, merged: no shortcut
        assert np.array_equal(m.count, ref.count)
        assert np.array_equal(m.mean, ref.mean)
        assert np.array_equal(m.m2, ref.m2)


def test_stream_fast_path_leaves_shared_states_alone():
    x = np.random.default_rng(3).standard_normal((6, 130)).astype(np.float32)
    m = Moments(x)
    m.update(x)  # merged in place: the shortcut is armed
    st = m.state()  # shared from here: the next in-place merge must copy first
    before = st.m2.copy()
    m.update(x)
    assert np.array_equal(st.m2, before)
    assert m.count == 18


def test_stream_fast_path_still_refuses_another_dimension():
    x = np.random.default_rng(4).standard_normal((6, 130)).astype(np.float32)
    m = Moments(x).update(x).update(x)
    with pytest.raises(ValueError, match="dimension mismatch"):
        m.update(np.ascontiguousarray(x[:, :129]))
    assert m.count == 18
