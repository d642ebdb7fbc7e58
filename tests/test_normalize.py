"""normalize: layouts, dtypes, out=, torch parity, adversarial offsets and bad input."""

from __future__ import annotations

import numpy as np
import pytest

import streamnorm
from streamnorm import normalize


def _reference(x, mean, var, axis, eps=1e-5, gamma=None, beta=None):
    """Slow and obvious: float64 (long double for the offset test) with broadcasting."""
    x = np.asarray(x)
    ax = tuple(range(x.ndim)) if axis is None else ((axis,) if np.isscalar(axis) else axis)
    ax = tuple(a % max(1, x.ndim) for a in ax)
    full = [1 if a in ax else x.shape[a] for a in range(x.ndim)]
    kept = [x.shape[a] for a in range(x.ndim) if a not in ax]

    def param(p):
        return np.broadcast_to(np.asarray(p, dtype=np.longdouble), kept).reshape(full)

    mean, var = param(mean), param(var)
    g = 1 if gamma is None else np.asarray(gamma, dtype=np.longdouble).reshape(full)
    b = 0 if beta is None else np.asarray(beta, dtype=np.longdouble).reshape(full)
    return (x.astype(np.longdouble) - mean) / np.sqrt(var + eps) * g + b


LAYOUTS = [
    ((64, 7), 0),
    ((8, 3, 5, 5), (0, 2, 3)),  # NCHW
    ((8, 5, 5, 3), (0, 1, 2)),  # NHWC
    ((4, 3, 6, 6), (2, 3)),  # per sample
    ((50,), 0),  # 1-D
    ((5, 4), ()),  # nothing reduced
    ((4, 3, 5, 6), (0, 3)),  # kept axes split: generic path
    ((3, 4, 5), None),  # everything reduced
    ((6, 2, 3, 4), (0, 2)),  # two kept axes (2, 4)
]


def _views(x):
    yield "C", x
    yield "F", np.asfortranarray(x)
    if x.ndim:
        yield "reversed", x[::-1]
        yield "strided", np.repeat(x, 2, axis=-1)[..., ::2]
    if x.ndim == 4:
        yield "channels_last", np.ascontiguousarray(np.moveaxis(x, 1, -1)).transpose(0, 3, 1, 2)


CASES = [(shape, axis, dt) for shape, axis in LAYOUTS for dt in (np.float32, np.float64)] + [
    (shape, axis, dt) for shape, axis in LAYOUTS[:2] for dt in (np.uint8, np.bool_, np.float16)
]


@pytest.mark.parametrize("shape, axis, dtype", CASES)
def test_against_reference(shape, axis, dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape) * 3 + 1
    x = (x > 1) if dtype == np.bool_ else (np.abs(x) * 10 if dtype == np.uint8 else x).astype(dtype)
    m = streamnorm.moments(x, axis)
    mean, var = np.asarray(m.mean, dtype=float), np.asarray(m.var(), dtype=float) + 0.25
    gamma, beta = rng.standard_normal(mean.shape), rng.standard_normal(mean.shape)
    want_dtype = np.float32 if dtype in (np.float32, np.float16) else np.float64
    for label, xv in _views(x):
        before = xv.copy()
        y = normalize(xv, mean, var, axis=axis, gamma=gamma, beta=beta)
        assert y.shape == xv.shape and y.dtype == want_dtype, label
        ref = _reference(xv, mean, var, axis, gamma=gamma, beta=beta)
        if want_dtype == np.float32:  # one rounding of the exact value
            np.testing.assert_array_equal(y, ref.astype(np.float32), err_msg=label)
        else:
            np.testing.assert_allclose(
                y, ref.astype(np.float64), rtol=1e-14, atol=1e-14, err_msg=label
            )
        np.testing.assert_array_equal(xv, before)  # input untouched


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "nc", "ncl"])
def test_matches_torch_batch_norm_eval(layout):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    g = torch.Generator().manual_seed(0)
    shape, axis = {"nc": ((16, 6), 0), "ncl": ((4, 6, 9), (0, 2))}.get(
        layout, ((4, 6, 5, 7), (0, 2, 3))
    )
    x = torch.randn(shape, generator=g) * 4 + 2
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    rm, rv = torch.randn(6, generator=g), torch.rand(6, generator=g) + 0.1
    w, b = torch.randn(6, generator=g), torch.randn(6, generator=g)
    want = F.batch_norm(x, rm, rv, w, b, training=False, eps=1e-3)
    got = normalize(x, rm, rv, axis=axis, gamma=w, beta=b, eps=1e-3)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
    if layout == "channels_last":
        assert got.is_contiguous(memory_format=torch.channels_last)  # layout kept, no copy
    out = torch.empty_like(x)
    assert normalize(x, rm, rv, axis=axis, gamma=w, beta=b, eps=1e-3, out=out) is out
    torch.testing.assert_close(out, want, rtol=2e-6, atol=2e-6)


def test_far_from_zero_float32_keeps_digits():
    # data near 1e4 with unit spread: folding the mean into a float32 shift loses digits
    rng = np.random.default_rng(1)
    x = (1e4 + rng.standard_normal((2000, 3))).astype(np.float32)
    mean, var = x.astype(np.float64).mean(0), x.astype(np.float64).var(0)
    y = normalize(x, mean, var, axis=0, eps=0.0)
    exact = _reference(x, mean, var, 0, eps=0.0).astype(np.float64)
    assert np.max(np.abs(y - exact)) < 1e-6
    scale = (1 / np.sqrt(var)).astype(np.float32)
    folded = x * scale + (-mean * scale).astype(np.float32)  # the usual float32 inference formula
    assert np.max(np.abs(folded - exact)) > 1e-4


def test_out_in_place_and_validation():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((10, 4)).astype(np.float32)
    mean, var = x.mean(0), x.var(0)
    want = normalize(x, mean, var, axis=0)
    y = x.copy()
    assert normalize(y, mean, var, axis=0, out=y) is y  # in place
    np.testing.assert_array_equal(y, want)
    out64 = np.empty(x.shape, np.float64)
    normalize(x, mean, var, axis=0, out=out64)
    np.testing.assert_allclose(out64, want, rtol=1e-6)
    fortran_out = np.empty(x.shape, np.float32, order="F")
    normalize(x, mean, var, axis=0, out=fortran_out)
    np.testing.assert_array_equal(fortran_out, want)
    # an out that overlaps x without being x: the result is still right
    buf = np.zeros(44, np.float32)
    src = buf[:40].reshape(10, 4)
    src[...] = x
    dst = buf[4:].reshape(10, 4)
    normalize(src, mean, var, axis=0, out=dst)
    np.testing.assert_array_equal(dst, want)
    with pytest.raises(ValueError, match="shape"):
        normalize(x, mean, var, axis=0, out=np.empty((10, 5), np.float32))
    with pytest.raises(TypeError, match="float32 or float64"):
        normalize(x, mean, var, axis=0, out=np.empty((10, 4), np.int32))
    ro = np.empty((10, 4), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        normalize(x, mean, var, axis=0, out=ro)
    with pytest.raises(TypeError, match="out"):
        normalize(x, mean, var, axis=0, out=[[0.0] * 4] * 10)


def test_bad_parameters():
    x = np.ones((5, 3))
    with pytest.raises(ValueError, match=r"mean has shape \(4,\), expected \(3,\)"):
        normalize(x, np.zeros(4), np.ones(3), axis=0)
    with pytest.raises(ValueError, match="var"):
        normalize(x, np.zeros(3), np.ones((2, 3)), axis=0)
    with pytest.raises(ValueError, match="var must be >= 0"):
        normalize(x, np.zeros(3), np.array([1.0, -1.0, 1.0]), axis=0)
    with pytest.raises(ValueError, match="eps"):
        normalize(x, 0.0, 1.0, axis=0, eps=-1e-5)
    with pytest.raises(TypeError, match="eps"):
        normalize(x, 0.0, 1.0, axis=0, eps="1e-5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="var \\+ eps is 0"):
        normalize(x, np.zeros(3), np.zeros(3), axis=0, eps=0.0)
    with pytest.raises(TypeError, match="dtype complex"):
        normalize(x.astype(complex), 0.0, 1.0, axis=0)
    with pytest.raises(TypeError, match="gamma"):
        normalize(x, 0.0, 1.0, axis=0, gamma=np.array(["a", "b", "c"]))
    with pytest.raises(np.exceptions.AxisError):
        normalize(x, 0.0, 1.0, axis=2)
    with pytest.raises(TypeError):
        normalize(x, 0.0, 1.0)  # type: ignore[call-arg]  # axis is required


def test_nan_propagates_to_its_element_only():
    x = np.arange(12.0).reshape(4, 3)
    x[1, 2] = np.nan
    y = normalize(x, np.zeros(3), np.ones(3), axis=0, eps=0.0)
    assert np.isnan(y[1, 2]) and np.isfinite(np.delete(y.ravel(), 5)).all()
    yv = normalize(x, np.zeros(3), np.array([1.0, np.nan, 1.0]), axis=0)  # NaN statistic
    assert np.isnan(yv[:, 1]).all() and np.isfinite(yv[:, 0]).all()


def test_feature_scaling_with_a_population_of_the_training_set():
    sklearn = pytest.importorskip("sklearn.datasets")
    X = sklearn.load_digits().data  # (1797, 64) bundled with scikit-learn
    train, test = X[:1500], X[1500:]
    pop = streamnorm.Population()
    for part in np.array_split(train, 12):
        pop.update(streamnorm.moments(part))
    z = normalize(train, pop.mean, pop.var, axis=0, eps=1e-12)
    live = train.std(0) > 0
    var = train.var(0)[live]
    np.testing.assert_allclose(z[:, live].mean(0), 0.0, atol=1e-12)
    np.testing.assert_allclose(z[:, live].var(0), var / (var + 1e-12), rtol=1e-12)
    assert np.all(z[:, ~live] == 0.0)  # constant pixels: 0, no division by zero
    zt = normalize(test, pop.mean, pop.var, axis=0, eps=1e-12)
    want = (test - train.mean(0)) / np.sqrt(train.var(0) + 1e-12)
    np.testing.assert_allclose(zt, want, rtol=1e-12, atol=1e-12)


def test_empty_and_scalar_inputs():
    e = normalize(np.zeros((0, 3), np.float32), np.zeros(3), np.ones(3), axis=0)
    assert e.shape == (0, 3) and e.dtype == np.float32
    s = normalize(np.array(3.0), 1.0, 4.0, axis=None, eps=0.0)
    assert s.shape == () and float(s) == 1.0


def test_same_bits_for_any_thread_count():
    import numba

    x = np.random.default_rng(3).standard_normal((64, 16, 9, 9)).astype(np.float32)
    mean, var = np.zeros(16), np.full(16, 2.0)
    before = numba.get_num_threads()
    try:
        outs = []
        for n in sorted({1, before}):
            numba.set_num_threads(n)
            outs.append(normalize(x, mean, var, axis=(0, 2, 3)))
    finally:
        numba.set_num_threads(before)
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])


@pytest.mark.parametrize(
    "shape, axis, layout",
    [((4096, 64), 0, "C"), ((32, 8, 32, 32), (0, 2, 3), "C"), ((32, 8, 32, 32), (0, 2, 3), "NHWC")],
)
def test_parallel_kernels_on_large_inputs(shape, axis, layout):
    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape).astype(np.float32) * 2 - 1
    if layout == "NHWC":
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1)).transpose(0, 3, 1, 2)
    assert x.nbytes >= 1 << 20  # above the serial-twin threshold
    C = shape[1]
    mean, var = rng.standard_normal(C), rng.uniform(0.5, 2, C)
    y = normalize(x, mean, var, axis=axis)
    np.testing.assert_array_equal(y, _reference(x, mean, var, axis).astype(np.float32))
