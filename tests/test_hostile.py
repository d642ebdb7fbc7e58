"""Hostile input and faults: overflow, masked arrays, Ctrl-C in kernels, impossible and corrupt
records, writes to non-regular files and file modes, odd dtypes; and the state interface."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import zipfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

import streamnorm
from streamnorm import Moments, Tracker
from streamnorm.estimators import Population
from streamnorm.estimators import from_dict as estimator_from_dict

ROOT = Path(__file__).resolve().parents[1]
FMAX = Fraction(float(np.finfo(np.float64).max))


def exact_mean_var(values: np.ndarray) -> tuple[Fraction, Fraction]:
    """Exact mean and biased variance of float64 values, as fractions."""
    fr = [Fraction(float(v)) for v in np.asarray(values, dtype=np.float64).ravel()]
    mean = sum(fr, Fraction(0)) / len(fr)
    var = sum(((f - mean) ** 2 for f in fr), Fraction(0)) / len(fr)
    return mean, var


def as_float(f: Fraction) -> float:
    """``f`` rounded to float64, ``inf`` past the range (``float(Fraction)`` raises there)."""
    return float(f) if abs(f) <= FMAX else (np.inf if f > 0 else -np.inf)


def assert_mean_exact(got: float, exact: Fraction, ulps: float = 1.0, scale: float = 0.0) -> None:
    """``got`` within ``ulps`` units in the last place of the exact mean, or, with ``scale``
    (the data's largest magnitude), within ``4 eps scale`` (the kernels' accuracy: relative to
    the spread, as for any data)."""
    ref = as_float(exact)
    err = abs(Fraction(float(got)) - exact)
    tol = Fraction(float(np.spacing(abs(ref)))) * Fraction(ulps)
    tol = max(tol, Fraction(4 * float(np.finfo(np.float64).eps)) * Fraction(scale))
    assert err <= tol, (got, ref)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


# --------------------------------------------------------------------------------------------
# 1. overflow with finite float64 input


def test_opposite_extremes_give_numpys_mean_and_infinite_variance():
    x = np.array([1e308, -1e308])
    m = streamnorm.moments(x)
    assert m.mean == 0.0 and np.mean(x) == 0.0
    with np.errstate(over="ignore"):
        assert np.isinf(m.var()) and np.isinf(np.var(x))
    assert m.count == 2


@pytest.mark.parametrize("policy", ["propagate", "raise", "omit"])
def test_spread_above_1e154_gives_the_right_mean_for_every_policy(policy):
    x = np.array([1e155, 2e155, 3e155])
    m = streamnorm.moments(x, nan_policy=policy)  # "raise" must not raise: nothing is NaN
    mean, var = exact_mean_var(x)
    assert_mean_exact(m.mean, mean)
    assert as_float(var) == np.inf and np.isinf(m.var())  # the true variance overflows


S = slice(None)


@pytest.mark.parametrize(
    "shape,axis,dim",
    [((40, 3), 0, (S, 1)), ((5, 3, 8), (0, 2), (S, 1, S)), ((3, 40), 1, (1, S))],
    ids=["rows", "channels-first", "strided"],
)
def test_overflow_is_redone_only_where_it_happened(rng, shape, axis, dim):
    x = rng.normal(1.0, 1.0, size=shape)
    normal = streamnorm.moments(x, axis)
    big = x.copy()
    big[dim] = big[dim] * 3e153 + 7e152  # dimension 1: huge values of both signs
    m = streamnorm.moments(big, axis)
    mean1, var1 = exact_mean_var(big[dim])
    assert_mean_exact(m.mean[1], mean1, scale=float(np.abs(big[dim]).max()))
    m2_exact = var1 * big[dim].size
    got = Fraction(float(m.m2[1])) if np.isfinite(m.m2[1]) else None
    if m2_exact > FMAX:
        assert got is None
    else:
        assert got is not None and abs(got - m2_exact) <= m2_exact / 10**12
    # the other dimensions are bit-identical to a run without the huge values
    for d in (0, 2):
        assert m.mean[d] == normal.mean[d] and m.m2[d] == normal.m2[d]


def test_overflow_when_reducing_everything():
    x = np.array([[1e308, -1e308], [3e307, 2.0]])
    m = streamnorm.moments(x, axis=None)
    assert_mean_exact(m.mean, exact_mean_var(x)[0], scale=1e308)
    assert np.isinf(m.var())


def test_overflow_with_weights_and_omit():
    x = np.array([[1e308, 1.0], [np.nan, 2.0], [-1e308, 4.0], [5e307, np.nan]])
    m = streamnorm.moments(x, nan_policy="omit")
    np.testing.assert_array_equal(m.count, [3, 3])
    assert_mean_exact(m.mean[0], exact_mean_var(np.array([1e308, -1e308, 5e307]))[0], scale=1e308)
    assert_mean_exact(m.mean[1], Fraction(7, 3), scale=4.0)
    assert np.isinf(m.var()[0])
    w = np.array([1.0, 0.0, 3.0, 2.0])
    y = np.nan_to_num(x, nan=0.0)
    mw = streamnorm.moments(y, weights=w)
    ref = Fraction(1e308) * 1 + Fraction(-1e308) * 3 + Fraction(5e307) * 2
    assert_mean_exact(mw.mean[0], ref / 6, scale=1e308)


def test_raise_message_counts_the_non_finite_values_it_names():
    x = np.array([[1e155, 1.0], [2e155, np.inf], [3e155, np.nan]])
    with pytest.raises(
        ValueError, match=r"^2 non-finite value\(s\) \(NaN/Inf\) in dimension\(s\) \[1\]"
    ):
        streamnorm.moments(x, nan_policy="raise")


# --------------------------------------------------------------------------------------------
# 2. masked arrays: the mask is honoured like nan_policy="omit"


def test_masked_entries_are_skipped():
    x = np.ma.masked_array([[1.0], [2.0], [1e6]], mask=[[0], [0], [1]])
    m = streamnorm.moments(x)
    assert m.mean.tolist() == [1.5]
    assert m.var().tolist() == [0.25]
    np.testing.assert_array_equal(m.count, [2])


def test_masked_array_matches_omit_and_keeps_the_policy_for_unmasked_values(rng):
    data = rng.normal(size=(30, 4)).astype(np.float32)
    mask = rng.random((30, 4)) < 0.3
    x = np.ma.masked_array(data, mask=mask)
    ref = streamnorm.moments(np.where(mask, np.nan, data), nan_policy="omit")
    m = streamnorm.moments(x)
    np.testing.assert_array_equal(m.count, ref.count)
    np.testing.assert_array_equal(m.mean, ref.mean)
    np.testing.assert_array_equal(m.m2, ref.m2)
    # a NaN under the mask is skipped; one outside it propagates (or raises)
    data2 = data.copy()
    data2[0, 1] = np.nan
    data2[1, 2] = np.nan
    mask2 = mask.copy()
    mask2[0, 1] = True
    mask2[1, 2] = False
    y = np.ma.masked_array(data2, mask=mask2)
    p = streamnorm.moments(y)
    assert np.isfinite(p.mean[1]) and np.isnan(p.mean[2])
    with pytest.raises(ValueError, match=r"^1 non-finite value\(s\).*\[2\]"):
        streamnorm.moments(y, nan_policy="raise")
    # integer data with a mask, and a mask with nothing masked
    xi = np.ma.masked_array(np.arange(6).reshape(3, 2), mask=[[0, 1], [0, 0], [1, 0]])
    mi = streamnorm.moments(xi)
    assert mi.mean.tolist() == [1.0, 4.0]
    none_masked = np.ma.masked_array(data, mask=False)
    np.testing.assert_array_equal(streamnorm.moments(none_masked).m2, streamnorm.moments(data).m2)


# --------------------------------------------------------------------------------------------
# 3. Ctrl-C during a kernel


def _interrupted(*args, **kwargs):
    """What Numba reports when a signal arrives during a parallel kernel."""
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt as ki:
        raise SystemError(
            "CPUDispatcher(<function k>) returned a result with an exception set"
        ) from ki


@pytest.mark.parametrize("which", ["run_rows", "reduce_batch"])
def test_interrupt_inside_a_kernel_arrives_as_keyboard_interrupt(monkeypatch, which):
    import streamnorm._compute as compute_module

    monkeypatch.setattr(compute_module, which, _interrupted)
    x = np.ones((8, 3)) if which == "run_rows" else np.ones((8, 3, 4))
    axis = 0 if which == "run_rows" else (0, 2)
    with pytest.raises(KeyboardInterrupt):
        streamnorm.moments(x, axis)
    with pytest.raises(KeyboardInterrupt):
        Tracker().update("bn", x)


def test_other_system_errors_pass_unchanged():
    from streamnorm._compute import call_kernel

    def broken() -> None:
        raise SystemError("something else")

    with pytest.raises(SystemError, match="something else"):
        call_kernel(broken)


@pytest.mark.slow
def test_real_sigint_during_a_parallel_kernel_is_a_keyboard_interrupt():
    code = (
        "import os, signal, threading, time, numpy as np, streamnorm\n"
        "x = np.ones((2_000_000, 4))\n"
        "streamnorm.moments(x[:100])\n"
        "def fire():\n"
        "    time.sleep(0.3)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "threading.Thread(target=fire).start()\n"
        "try:\n"
        "    for _ in range(100000):\n"
        "        streamnorm.moments(x)\n"
        "except KeyboardInterrupt:\n"
        "    print('KeyboardInterrupt')\n"
        "except BaseException as e:\n"
        "    print('other', type(e).__name__)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.stdout.strip() == "KeyboardInterrupt", r.stdout + r.stderr[-2000:]


# --------------------------------------------------------------------------------------------
# 4. impossible states


@pytest.mark.parametrize(
    "count,m2,match",
    [
        (3, [-1.0], "m2"),
        (-3, [1.0], "counts"),
        (np.nan, [1.0], "counts"),
        ([np.inf], [1.0], "counts"),
    ],
)
def test_from_arrays_rejects_impossible_states(count, m2, match):
    with pytest.raises(ValueError, match=match):
        Moments.from_arrays(count, [0.0], m2)


def _record(**changes):
    d = streamnorm.moments(np.arange(6.0).reshape(3, 2)).to_dict()
    d.update(changes)
    return d


@pytest.mark.parametrize(
    "changes",
    [
        {"m2": np.array([-1.0, 2.0])},
        {"count": np.array([-3.0, 3.0])},
        {"count": np.array([np.nan, 3.0])},
        {"total": -3.0},
        {"total": np.nan},
        {"shape": np.array([-2])},
    ],
    ids=["m2", "count", "nan-count", "total", "nan-total", "shape"],
)
def test_impossible_records_are_refused(tmp_path, changes):
    with pytest.raises(ValueError, match="impossible|corrupt"):
        Moments.from_dict(_record(**changes))
    path = tmp_path / "m.npz"
    np.savez(path, **_record(**changes))
    with pytest.raises(ValueError, match="impossible|corrupt"):
        Moments.load(path)


def test_impossible_estimator_and_tracker_records_are_refused():
    pop = Population().update(streamnorm.moments(np.arange(6.0).reshape(3, 2)))
    d = pop.to_dict()
    bad_m2 = {**d, "state_m2": -np.abs(d["state_m2"]) - 1.0}
    with pytest.raises(ValueError, match="negative"):
        estimator_from_dict(bad_m2)
    with pytest.raises(ValueError, match="counts"):
        estimator_from_dict({**d, "count": np.array([np.nan, 3.0])})
    with pytest.raises(ValueError, match="batches"):
        estimator_from_dict({**d, "batches": -1})
    tr = Tracker({"pop": Population()})
    tr.update("bn", np.arange(12.0).reshape(6, 2))
    td = tr.to_dict()
    key = next(k for k in td if k.startswith("layer.0.0.") and k.endswith("state_m2"))
    with pytest.raises(ValueError, match="negative"):
        Tracker.from_dict({**td, key: -np.ones(2)})
    ckey = next(k for k in td if k.startswith("layer.0.0.") and k.endswith(".count"))
    with pytest.raises(ValueError, match="counts"):
        Tracker.from_dict({**td, ckey: -np.ones(2)})
    with pytest.raises(ValueError, match="epoch"):
        Tracker.from_dict({**td, "epoch": -1})


# --------------------------------------------------------------------------------------------
# 5. corrupt and foreign files


@pytest.fixture(params=["moments", "tracker"])
def saved(request, tmp_path):
    path = tmp_path / "state.npz"
    if request.param == "moments":
        streamnorm.moments(np.arange(12.0).reshape(4, 3)).save(path)
        return path, Moments.load
    tr = Tracker()
    tr.update("bn", np.arange(24.0).reshape(8, 3))
    tr.save(path)
    return path, Tracker.load


def test_npy_file_is_a_value_error(tmp_path, saved):
    _, load = saved
    npy = tmp_path / "x.npy"
    np.save(npy, np.ones(3))
    with pytest.raises(ValueError, match="single array"):
        load(npy)


def test_truncated_file_is_a_value_error(tmp_path, saved):
    path, load = saved
    data = path.read_bytes()
    for cut in (0, 10, len(data) // 2, len(data) - 1):
        p = tmp_path / f"cut{cut}.npz"
        p.write_bytes(data[:cut])
        with pytest.raises(ValueError):
            load(p)


def _set_zip_fields(data: bytes, flag: int | None = None, method: int | None = None) -> bytes:
    """Set the flag bits / compression method of every zip entry (local and central headers)."""
    b = bytearray(data)
    for sig, off in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        i = b.find(sig)
        while i >= 0:
            if flag is not None:
                b[i + off] |= flag
            if method is not None:
                b[i + off + 2 : i + off + 4] = method.to_bytes(2, "little")
            i = b.find(sig, i + 4)
    return bytes(b)


@pytest.mark.parametrize(
    "damage", [{"flag": 1}, {"method": 99}, {"method": 14}], ids=["encrypted", "method99", "lzma"]
)
def test_damaged_zip_headers_are_value_errors(tmp_path, saved, damage):
    path, load = saved
    bad = tmp_path / "bad.npz"
    bad.write_bytes(_set_zip_fields(path.read_bytes(), **damage))
    with pytest.raises(ValueError, match="not a readable"):
        load(bad)


def test_every_single_bit_flip_loads_or_is_a_value_error(tmp_path):
    path = tmp_path / "m.npz"
    ref = streamnorm.moments(np.arange(6.0).reshape(3, 2))
    ref.save(path)
    data = path.read_bytes()
    bad = tmp_path / "flip.npz"
    for pos in range(0, len(data) * 8, 13):
        b = bytearray(data)
        b[pos // 8] ^= 1 << (pos % 8)
        bad.write_bytes(bytes(b))
        try:
            got = Moments.load(bad)
        except ValueError:
            continue
        # a flip in a field the reader ignores (a timestamp, a name): the state is intact
        np.testing.assert_array_equal(got.m2, ref.m2)


def test_a_directory_and_a_missing_file_keep_their_os_errors(tmp_path):
    with pytest.raises(IsADirectoryError):
        Moments.load(tmp_path)
    with pytest.raises(FileNotFoundError):
        Moments.load(tmp_path / "missing.npz")


def test_zip_that_is_not_numpy_is_a_value_error(tmp_path):
    p = tmp_path / "other.npz"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(ValueError):
        Moments.load(p)


# --------------------------------------------------------------------------------------------
# 6-7. writes: non-regular targets, modes


def test_save_to_a_fifo_writes_through_and_keeps_the_fifo(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []

    def read() -> None:
        with open(fifo, "rb") as f:
            got.append(f.read())

    th = threading.Thread(target=read, daemon=True)
    th.start()
    m = streamnorm.moments(np.arange(6.0).reshape(3, 2))
    m.save(fifo)
    th.join(timeout=30)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["pipe"]  # no temp file left behind
    out = tmp_path.parent / f"{tmp_path.name}-copy.npz"
    out.write_bytes(got[0])
    try:
        np.testing.assert_array_equal(Moments.load(out).m2, m.m2)
    finally:
        out.unlink()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="mknod needs root")
def test_save_to_a_character_device_keeps_the_device(tmp_path):
    node = tmp_path / "null"
    os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a null device, as /dev/null
    try:
        with open(node, "wb") as f:
            f.write(b"")
    except OSError:
        pytest.skip("device nodes cannot be opened on this file system (nodev)")
    streamnorm.moments(np.ones((3, 2))).save(node)
    st = os.stat(node)
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    assert [p.name for p in tmp_path.iterdir()] == ["null"]


def test_overwrite_keeps_the_mode(tmp_path):
    path = tmp_path / "m.npz"
    for mode in (0o644, 0o640, 0o604):
        path.write_bytes(b"old")
        os.chmod(path, mode)
        streamnorm.moments(np.ones((3, 2))).save(path)
        assert stat.S_IMODE(os.stat(path).st_mode) == mode
        assert Moments.load(path).count == 3


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_new_files_honour_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = tmp_path / f"m{umask:o}.npz"
        streamnorm.moments(np.ones((3, 2))).save(path)
        tr = Tracker()
        tr.update("bn", np.ones((4, 2)))
        tpath = tmp_path / f"t{umask:o}.npz"
        tr.save(tpath)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(os.stat(tpath).st_mode) == 0o666 & ~umask


# --------------------------------------------------------------------------------------------
# 10. odd inputs


def test_cpu_bfloat16_tensor():
    torch = pytest.importorskip("torch")
    t = torch.randn(16, 3, 4, 4).to(torch.bfloat16)
    m = streamnorm.moments(t, (0, 2, 3))
    ref = streamnorm.moments(t.float().numpy(), (0, 2, 3))
    np.testing.assert_array_equal(m.mean, ref.mean)
    np.testing.assert_array_equal(m.m2, ref.m2)
    assert m.count == 16 * 16


def test_zero_d_input_says_what_to_do():
    for x in (np.float64(3.0), np.array(3.0), 3.0):
        with pytest.raises(ValueError, match=r"0-d .*np\.atleast_1d"):
            streamnorm.moments(x)


# --------------------------------------------------------------------------------------------
# the state interface and the double-double mean


def test_mean_is_rounded_from_its_double_double_pair():
    """5,000 single rows merged onto a batch near 1e8: within 1 ulp of the exact mean."""
    rng = np.random.default_rng(3)
    base = 1e8 + rng.normal(size=(1000, 1))
    rows = 1e8 + rng.normal(size=(5000, 1))
    m = streamnorm.moments(base)
    for r in rows:
        m.update(r[None])
    mean, _ = exact_mean_var(np.concatenate([base, rows]))
    assert_mean_exact(m.mean[0], mean, ulps=1.0)
    # and it survives a save/load round trip and a pickle
    import pickle

    assert pickle.loads(pickle.dumps(m)).mean[0] == m.mean[0]


def test_state_is_never_changed_after_it_was_handed_out():
    m = streamnorm.moments(np.arange(6.0).reshape(3, 2))
    st = m.state()
    assert st is not None
    before = (st.n.copy(), st.mean.copy(), st.m2.copy())
    m.update(np.ones((2, 2)) * 50)
    m += streamnorm.moments(np.ones((4, 2)))
    for a, b in zip(before, (st.n, st.mean, st.m2), strict=True):
        np.testing.assert_array_equal(a, b)
    again = Moments.from_state(st)
    again.update(np.zeros((1, 2)))
    np.testing.assert_array_equal(before[1], st.mean)
    assert Moments.from_state(None).shape is None and Moments().state() is None
    with pytest.raises(TypeError):
        Moments.from_state(m)  # type: ignore[arg-type]
