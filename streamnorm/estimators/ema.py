"""EMA: exponential moving average of batch statistics (PyTorch, Keras and ONNX styles)."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from .._validate import (
    check_bool,
    check_choice,
    check_fraction,
    check_momentum,
    renamed_attribute,
    renamed_keyword,
)
from . import _kernels as EK
from ._base import Estimator, state_array

STYLES = ("torch", "keras")


class EMA(Estimator):
    """Exponential moving average of the batch means and batch variances.

    Parameters
    ----------
    momentum : float, default 0.1
        ``style="torch"``: the weight of the new batch, ``s <- (1 - p) s + p x``, in
        ``(0, 1]`` (PyTorch default 0.1). ``style="keras"``: the weight of the old state,
        ``s <- p s + (1 - p) x``, in ``[0, 1)`` (Keras default 0.99, ONNX 0.9).
    style : {"torch", "keras"}, default "torch"
        Which of the two parametrizations ``momentum`` follows. (Called ``convention`` before;
        that keyword still works, with a ``DeprecationWarning``, for one release.)
    unbiased : bool, default True
        Average the unbiased batch variances ``M2 / (n - 1)`` (PyTorch) rather than the biased
        ones ``M2 / n`` (Keras, ONNX: pass ``unbiased=False``).
    bias_correction : bool, default False
        Divide out the weight left on the start values, as Adam does (Caffe's scale factor):
        ``(s_t - decay^t s_0) / (1 - decay^t)``. After one batch the estimate equals that batch's
        statistics instead of being pulled toward the start values 0 (mean) and 1 (variance).

    Notes
    -----
    The state starts at mean 0 and variance 1, as a freshly built BatchNorm layer. With
    ``style="torch"`` and ``unbiased=True`` the state is exactly what
    ``torch.nn.BatchNorm{1,2,3}d`` stores in ``running_mean`` / ``running_var`` after the same
    batches (computed in float64, so it matches PyTorch's float32 buffers to float32 rounding),
    and :attr:`var` returns that stored value. ``var_convention`` is ``"unbiased"`` when
    ``unbiased`` else ``"biased"``; the average of the other convention's batch variances is
    kept as well, so :meth:`running_var` converts exactly.

    An EMA cannot be merged: it depends on the order of the batches, and the EMAs of two
    interleaved streams are not the EMA of the combined stream. To use several processes,
    all-reduce each batch's moments before the update (``Tracker(reduce=...)``).

    Every batch needs at least 2 samples per dimension when ``unbiased`` (PyTorch raises too),
    at least 1 otherwise.

    Examples
    --------
    >>> import numpy as np, streamnorm
    >>> ema = streamnorm.EMA(momentum=0.5)
    >>> _ = ema.update(streamnorm.moments(np.array([[1.0], [3.0]])))
    >>> ema.mean.tolist(), ema.var.tolist()      # 0.5 * 0 + 0.5 * 2,  0.5 * 1 + 0.5 * 2
    ([1.0], [1.5])
    """

    _renamed_params: ClassVar[dict[str, str]] = {"convention": "style"}

    _param_names = ("momentum", "style", "unbiased", "bias_correction")

    def __init__(
        self,
        momentum: float = 0.1,
        style: str = "torch",
        unbiased: bool = True,
        bias_correction: bool = False,
        *,
        convention: str | None = None,
    ) -> None:
        style = renamed_keyword("EMA", "convention", "style", convention, style, default="torch")
        self.style = check_choice("style", style, STYLES)
        if self.style == "torch":
            p = check_momentum(
                momentum, "momentum of style='torch' (the new batch's weight, PyTorch 0.1)"
            )
            self._decay, self._rate = 1.0 - p, p
        else:
            p = check_fraction(
                "momentum of style='keras' (the old state's weight, Keras 0.99)",
                momentum,
                closed="left",
            )
            self._decay, self._rate = p, 1.0 - p
        self.momentum = p
        self.unbiased = check_bool("unbiased", unbiased)
        self.bias_correction = check_bool("bias_correction", bias_correction)
        super().__init__()

    #: Deprecated name of :attr:`style` (``"torch"`` or ``"keras"``).
    convention = renamed_attribute("EMA", "convention", "style")

    @property
    def min_batch_count(self) -> int:
        return 2 if self.unbiased else 1

    def _clear_state(self) -> None:
        self._mu = np.zeros(0)
        self._var_u = np.zeros(0)
        self._var_b = np.zeros(0)
        self._pow = 1.0

    def _init_state(self, D: int) -> None:
        self._mu = np.zeros(D)
        self._var_u = np.ones(D)
        self._var_b = np.ones(D)
        self._pow = 1.0

    def _apply(
        self, n: np.ndarray, mu: np.ndarray, m2: np.ndarray, epochs: np.ndarray, uniform: bool
    ) -> None:
        EK.ema_rows(n, mu, m2, self._decay, self._rate, self._mu, self._var_u, self._var_b, uniform)
        for _ in range(mu.shape[0]):
            self._pow *= self._decay

    def _correct(self, s: np.ndarray, start: float) -> np.ndarray:
        if not self.bias_correction or self._pow == 1.0:
            return s.copy()
        return (s - self._pow * start) / (1.0 - self._pow)

    def _mean_flat(self) -> np.ndarray:
        return self._correct(self._mu, 0.0)

    def _var_flat(self, convention: str) -> np.ndarray:
        return self._correct(self._var_u if convention == "unbiased" else self._var_b, 1.0)

    @property
    def state(self) -> tuple[np.ndarray, np.ndarray]:
        """The raw ``(mean, var)`` state without bias correction (what a BN layer stores)."""
        self._sync()
        self._need_data()
        raw = self._var_u if self.unbiased else self._var_b
        return self._out(self._mu), self._out(raw)

    def _state(self) -> dict[str, Any]:
        return {
            "mean": self._mu,
            "var_unbiased": self._var_u,
            "var_biased": self._var_b,
            "decay_power": np.float64(self._pow),
        }

    def _set_state(self, d: Any, D: int) -> None:
        self._mu = state_array(d, "mean", (D,))
        self._var_u = state_array(d, "var_unbiased", (D,))
        self._var_b = state_array(d, "var_biased", (D,))
        self._pow = float(state_array(d, "decay_power", ()))

    def merge(self, other: Estimator) -> Estimator:
        """Not possible: raises ``TypeError`` (see Notes)."""
        raise TypeError(
            "an EMA cannot be merged: it depends on the order of the batches, and the EMAs of "
            "two streams are not the EMA of the combined stream; all-reduce each batch's "
            "Moments before updating instead (Tracker(reduce=...)), or use Population, "
            "CumulativeAverage or WindowedAverage"
        )
