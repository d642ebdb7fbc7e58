"""Every bad input gets a clear TypeError/ValueError and leaves the state untouched."""

from __future__ import annotations

import numpy as np
import pytest

from streamnorm import Moments, moments


@pytest.mark.parametrize(
    "x,what",
    [
        (np.ones(3, dtype=complex), "complex"),
        (np.array([1, "a"], dtype=object), "object"),
        (np.array(["a", "b"]), "string|<U1"),
        (np.array(["2020-01-01"], dtype="datetime64[D]"), "datetime"),
        (np.array([1], dtype="timedelta64[s]"), "timedelta"),
    ],
)
def test_unsupported_dtypes(x, what):
    with pytest.raises(TypeError, match="unsupported dtype") as e:
        moments(x)
    assert str(x.dtype) in str(e.value)


def test_zero_d():
    with pytest.raises(ValueError, match="0-d"):
        moments(np.float64(3.0))
    with pytest.raises(ValueError, match="0-d"):
        moments(np.array(3.0))


def test_axis_errors():
    x = np.ones((3, 4))
    with pytest.raises(np.exceptions.AxisError):
        moments(x, axis=2)
    with pytest.raises(np.exceptions.AxisError):
        moments(x, axis=(0, -3))
    with pytest.raises(ValueError, match="repeated"):
        moments(x, axis=(0, -2))
    with pytest.raises(TypeError, match="axis"):
        moments(x, axis="0")
    with pytest.raises(TypeError, match="axis"):
        moments(x, axis=(0.5,))
    with pytest.raises(TypeError, match="axis"):
        moments(x, axis=True)
    with pytest.raises(TypeError, match="axis"):
        moments(x, axis=np.array([0, 1]))
    np.testing.assert_array_equal(moments(x, axis=[0]).mean, moments(x, axis=0).mean)


def test_dimension_mismatch_names_both_shapes_and_keeps_state():
    m = moments(np.ones((5, 3)))
    before = m.to_dict()
    with pytest.raises(ValueError, match=r"\(3,\).*\(4,\)"):
        m.update(np.ones((5, 4)))
    with pytest.raises(ValueError, match="dimension mismatch"):
        m + moments(np.ones((2, 2, 2)), (0,))
    with pytest.raises(ValueError, match="dimension mismatch"):
        m += moments(np.ones(4))
    for k, v in before.items():
        np.testing.assert_array_equal(m.to_dict()[k], v)


def test_empty_state_reads():
    m = Moments()
    assert m.count == 0 and m.shape is None
    for f in (lambda: m.mean, lambda: m.m2, lambda: m.var(), lambda: m.std()):
        with pytest.raises(ValueError, match="empty Moments"):
            f()


def test_bad_ddof_and_merge_types():
    m = moments(np.ones((3, 2)))
    with pytest.raises(ValueError, match="ddof"):
        m.var(ddof=-1)
    with pytest.raises(TypeError):
        m + 1
    with pytest.raises(TypeError, match="merge_all"):
        Moments.merge_all([m, 3])


def test_missing_extra_is_an_import_error_with_the_install_hint():
    from streamnorm._errors import MissingExtraError, StreamnormError
    from streamnorm._extras import require

    with pytest.raises(MissingExtraError) as info:
        require("streamnorm_no_such_module", "torch")
    e = info.value
    assert isinstance(e, ImportError) and isinstance(e, StreamnormError)
    assert "pip install 'streamnorm[torch]'" in str(e)
    assert isinstance(e.__cause__, ModuleNotFoundError)
    assert require("math").sqrt(4.0) == 2.0
