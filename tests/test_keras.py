"""streamnorm.keras: tracking and recalibrating keras.layers.BatchNormalization (torch backend,
and the JAX backend in a subprocess when JAX is installed)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

# Keras picks its backend once, at its first import; torch is installed with the test extras
os.environ.setdefault("KERAS_BACKEND", "torch")
pytest.importorskip("torch")
keras = pytest.importorskip("keras")

import streamnorm  # noqa: E402
from streamnorm.keras import bn_layers, recalibrate, track  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _np(v):
    return np.asarray(keras.ops.convert_to_numpy(v), dtype=np.float64)


def _model(dropout=False, seed=0):
    """Conv -> BN (channels last, axis=-1) -> ReLU -> [Dropout] -> Permute -> BN (axis=1)."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((8, 8, 2))
    h = keras.layers.Conv2D(4, 3, name="conv")(inp)
    h = keras.layers.BatchNormalization(name="bn_last", momentum=0.9)(h)
    h = keras.layers.ReLU()(h)
    if dropout:
        h = keras.layers.Dropout(0.5)(h)
    h = keras.layers.Permute((3, 1, 2))(h)  # (N, 4, 6, 6): channels on axis 1
    h = keras.layers.BatchNormalization(axis=1, name="bn_first", momentum=0.9)(h)
    h = keras.layers.Flatten()(h)
    out = keras.layers.Dense(2)(h)
    model = keras.Model(inp, out)
    model.compile(
        keras.optimizers.SGD(0.05), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    return model


def _data(n=100, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, 8, 8, 2)) * np.array([2.0, 0.5]) + np.array([1.0, -3.0])).astype(
        "float32"
    )
    y = rng.integers(0, 2, n)
    return x, y


def _moments(a, layer):
    axis = layer.axis % a.ndim
    red = tuple(i for i in range(a.ndim) if i != axis)
    return a.mean(axis=red), a.var(axis=red)  # Keras keeps the biased variance


def _inputs(model, x, training):
    """Each BN layer's input (numpy, float64) through a sub-model of ``model``."""
    layers = [layer for _, layer in bn_layers(model)]
    sub = keras.Model(model.input, [layer.input for layer in layers])
    outs = sub(x, training=training)
    return {layer.name: _np(o) for layer, o in zip(layers, outs, strict=True)}


@pytest.mark.slow
def test_track_ema_equals_keras_moving_statistics():
    x, y = _data()
    model = _model()
    proto = {"ema": streamnorm.EMA(0.9, style="keras", unbiased=False)}
    tracker = streamnorm.Tracker(proto)
    with track(model, tracker) as t:
        assert t is tracker
        model.fit(x, y, batch_size=20, epochs=2, verbose=0, shuffle=False)
    names = [n for n, _ in bn_layers(model)]
    assert names == ["bn_last", "bn_first"]
    for name, layer in bn_layers(model):
        est = tracker.estimator(name, "ema")
        assert est.batches == 10
        np.testing.assert_allclose(est.mean, _np(layer.moving_mean), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(est.var, _np(layer.moving_variance), rtol=1e-5, atol=1e-6)
    # the original call methods are back: inference does not feed the tracker
    assert "call" not in vars(model.get_layer("bn_last"))
    with track(model, tracker):
        model(x[:10], training=False)
    assert tracker.estimator("bn_last", "ema").batches == 10


def test_population_sequential_is_the_fixed_point():
    x, y = _data()
    model = _model(dropout=True)
    model(x[:4])
    report = recalibrate(model, x, mode="sequential", batch_size=32, progress=False)
    assert [r.name for r in report.layers] == ["bn_last", "bn_first"]
    assert report.samples == 100 and report["bn_last"].batches == 4
    # afterwards every layer's inference-mode input has exactly the stored statistics
    got = _inputs(model, x, training=False)
    for _, layer in bn_layers(model):
        mean, var = _moments(got[layer.name], layer)
        np.testing.assert_allclose(_np(layer.moving_mean), mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(_np(layer.moving_variance), var, rtol=1e-5, atol=1e-6)
    report.restore()
    np.testing.assert_array_equal(_np(model.get_layer("bn_last").moving_variance), np.ones(4))


def _batch_inputs(model, batches):
    """One-pass reference: BN inputs with every BN layer normalizing by batch statistics, on a
    clone (training=True would move the clone's statistics, not the model's)."""
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    per = [_inputs(clone, b, training=True) for b in batches]
    return {k: [p[k] for p in per] for k in per[0]}


@pytest.mark.parametrize("estimator", ["population", "cumulative"])
def test_one_pass_population_and_cumulative(estimator):
    x, y = _data(90)
    model = _model(seed=1)
    model.fit(x, y, batch_size=30, epochs=1, verbose=0)
    ref = _batch_inputs(model, [x[:32], x[32:64], x[64:80]])
    report = recalibrate(
        model, x, estimator=estimator, num_samples=80, batch_size=32, progress=False
    )
    assert report.samples == 80
    for _, layer in bn_layers(model):
        parts = ref[layer.name]
        if estimator == "population":
            mean, var = _moments(np.concatenate(parts), layer)
        else:
            stats = [_moments(p, layer) for p in parts]
            mean = np.mean([s[0] for s in stats], axis=0)
            var = np.mean([s[1] for s in stats], axis=0)
        np.testing.assert_allclose(_np(layer.moving_mean), mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(_np(layer.moving_variance), var, rtol=1e-5, atol=1e-6)
        assert layer.momentum == 0.9


def test_ema_equals_keras_own_update():
    x, _ = _data(60)
    model = _model(seed=2)
    model(x[:4])
    twin = keras.models.clone_model(model)
    twin.set_weights(model.get_weights())
    for b in (x[:20], x[20:40], x[40:]):
        twin(b, training=True)  # Keras' own moving-average update, weights unchanged
    recalibrate(model, x, estimator="ema", momentum=0.9, batch_size=20, progress=False)
    for name, layer in bn_layers(model):
        other = twin.get_layer(name)
        np.testing.assert_allclose(
            _np(layer.moving_mean), _np(other.moving_mean), rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(
            _np(layer.moving_variance), _np(other.moving_variance), rtol=1e-5, atol=1e-6
        )


def test_frozen_layers_and_failure_restore():
    x, _ = _data(40)
    model = _model(seed=3)
    model(x[:4])
    layer = model.get_layer("bn_last")
    layer.trainable = False
    before = [_np(v) for v in layer.non_trainable_variables]
    bad = x.copy()
    bad[25] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        recalibrate(model, bad, batch_size=20, progress=False)
    for v, old in zip(layer.non_trainable_variables, before, strict=True):
        np.testing.assert_array_equal(_np(v), old)
    assert layer.trainable is False and layer.momentum == 0.9
    assert "call" not in vars(layer)
    recalibrate(model, x, batch_size=20, progress=False)  # frozen layers are recalibrated too
    assert not np.allclose(_np(layer.moving_variance), before[1])
    assert layer.trainable is False


def test_errors():
    with pytest.raises(TypeError, match="keras.Model"):
        recalibrate(object(), np.zeros((4, 8, 8, 2)))
    unbuilt = keras.Sequential([keras.layers.Dense(3), keras.layers.BatchNormalization()])
    with pytest.raises(ValueError, match="not built"):
        recalibrate(unbuilt, np.zeros((4, 5)))
    model = _model()
    model(np.zeros((2, 8, 8, 2), "float32"))
    with pytest.raises(ValueError, match="momentum"):
        recalibrate(model, np.zeros((4, 8, 8, 2)), estimator="ema", momentum=1.0)
    with pytest.raises(ValueError, match="BatchNormalization"):
        recalibrate(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]), np.zeros((4, 3)))
    with pytest.raises(TypeError, match="update"):
        with track(model, object()):
            pass


def test_data_that_do_not_fit_the_model_are_one_line_exit_2(tmp_path, capsys):
    """Keras' own errors about the data (shape, rank) are an InputError: exit 2, one line."""
    from streamnorm._errors import InputError
    from streamnorm.cli import main

    model = _model(seed=5)
    src, out = tmp_path / "model.keras", tmp_path / "new.keras"
    model.save(src)
    digest = _sha(src)
    for shape in ((6, 8, 8, 4), (6, 8, 8), (6, 5, 5, 2)):
        x = np.ones(shape, "float32")
        with pytest.raises(InputError, match="do not fit the model") as info:
            recalibrate(model, x, batch_size=3, progress=False)
        assert str((3, *shape[1:])) in str(info.value) and "\n" not in str(info.value)
        data = tmp_path / "x.npy"
        np.save(data, x)
        argv = ["calibrate", str(src), "--data", str(data), "--out", str(out), "--no-progress"]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "do not fit the model" in err, err
        assert "Traceback" not in err
        assert not out.exists() and _sha(src) == digest
    assert "call" not in vars(model.get_layer("bn_last"))  # the layers are restored


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.slow
def test_cli_writes_a_new_keras_file(tmp_path, capsys):
    from streamnorm.cli import main

    x, y = _data(70)
    model = _model(seed=4)
    model.fit(x, y, batch_size=35, epochs=1, verbose=0)
    src, data, out = tmp_path / "model.keras", tmp_path / "x.npy", tmp_path / "new.keras"
    model.save(src)
    np.save(data, x)
    digest = _sha(src)
    argv = ["calibrate", str(src), "--data", str(data), "--out", str(out), "--no-progress"]
    rc = main([*argv, "--mode", "sequential", "--batch-size", "32"])
    assert rc == 0, capsys.readouterr().err
    assert _sha(src) == digest  # the input is untouched
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []
    new = keras.saving.load_model(out)
    got = _inputs(new, x, training=False)
    for _, layer in bn_layers(new):
        mean, var = _moments(got[layer.name], layer)
        np.testing.assert_allclose(_np(layer.moving_mean), mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(_np(layer.moving_variance), var, rtol=1e-5, atol=1e-6)
    # the same as the library on the loaded input
    ref = keras.saving.load_model(src)
    recalibrate(ref, x, mode="sequential", batch_size=32, progress=False)
    for a, b in zip(ref.get_weights(), new.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    # --out must not be the input; bad options leave nothing written
    assert main([*argv[:4], "--out", str(src), "--no-progress"]) != 0
    assert main([*argv, "--workers", "2"]) != 0
    assert _sha(src) == digest


_JAX_SCRIPT = textwrap.dedent(
    """
    import numpy as np, keras, streamnorm
    from streamnorm.keras import bn_layers, recalibrate, track
    assert keras.backend.backend() == "jax"
    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 3))
    h = keras.layers.Dense(4)(inp)
    h = keras.layers.BatchNormalization(momentum=0.9)(h)
    out = keras.layers.Dense(2)(keras.layers.Flatten()(h))
    model = keras.Model(inp, out)
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(60, 6, 3)) * 2 + 1).astype("float32")
    y = rng.integers(0, 2, 60)
    tracker = streamnorm.Tracker({"ema": streamnorm.EMA(0.9, "keras", unbiased=False)})
    with track(model, tracker):  # jitted training step: inputs reach the host by callback
        model.fit(x, y, batch_size=20, epochs=2, verbose=0, shuffle=False)
    (name, bn), = bn_layers(model)
    est = tracker.estimator(name, "ema")
    assert est.batches == 6, est.batches
    np.testing.assert_allclose(est.mean, np.asarray(bn.moving_mean), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(est.var, np.asarray(bn.moving_variance), rtol=1e-5, atol=1e-6)
    recalibrate(model, x, progress=False)
    a = np.asarray(keras.Model(model.input, bn.input)(x), dtype=np.float64).reshape(-1, 4)
    np.testing.assert_allclose(np.asarray(bn.moving_mean), a.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(bn.moving_variance), a.var(0), rtol=1e-5, atol=1e-6)
    print("ok")
    """
)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="JAX is not installed")
def test_jax_backend():
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    res = subprocess.run(
        [sys.executable, "-c", _JAX_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


@pytest.mark.slow
def test_missing_backend_names_keras_backend():
    code = "import streamnorm.keras"
    env = {**os.environ, "KERAS_BACKEND": "tensorflow"}
    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("tensorflow is installed")
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode != 0
    assert "MissingExtraError" in res.stderr and "KERAS_BACKEND" in res.stderr
