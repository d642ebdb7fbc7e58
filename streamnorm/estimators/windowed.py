"""WindowedAverage: average over the middle epochs, dropping the first and the last ones."""

from __future__ import annotations

from fractions import Fraction
from typing import Any, ClassVar, cast

import numpy as np

from .._errors import RecordError
from .._kernels import chan_merge_into
from .._validate import check_bool, check_choice, check_drop, renamed_attribute, renamed_keyword
from . import _kernels as EK
from ._base import Estimator, state_array

VAR_MODES = ("pooled", "mean_of_batch")


def _as_ratio(drop: int | float) -> tuple[int, int] | int:
    """An int drop as is; a fraction as the exact ratio of the decimal it prints as.

    ``0.29`` of 100 epochs drops 29, although ``0.29 * 100`` is ``28.999999999999996`` in binary
    floating point.
    """
    if isinstance(drop, int):
        return drop
    f = Fraction(repr(drop))
    return (f.numerator, f.denominator)


class WindowedAverage(Estimator):
    """Average of the batch statistics over the middle epochs of training.

    Keeps one pooled state per epoch (``O(epochs x D)`` memory) and combines the epochs left
    after dropping the first ``drop_first`` and the last ``drop_last`` epochs seen. Early
    statistics come from immature weights and differ from the final ones (bias), while a single
    late epoch is noisy; averaging the middle of training is a compromise between the two.

    Parameters
    ----------
    drop_first, drop_last : int or float, default 0.25
        An int drops that many epochs; a float in ``[0, 0.5)`` drops that fraction of the epochs
        seen, rounded down (10 epochs, 0.25: drops 2). Epochs are those that received batches.
    var_mode : {"pooled", "mean_of_batch"}, default "pooled"
        ``"pooled"``: the exact mean and variance of all the samples of the kept epochs (law of
        total variance, count-weighted). ``"mean_of_batch"`` (Ioffe & Szegedy): the mean of the
        batch means and the mean of the batch variances of the kept epochs, one weight per batch.
        The same choice as :class:`CumulativeAverage`'s ``var_mode``. (Called ``mode`` before;
        that keyword still works, with a ``DeprecationWarning``, for one release.)
    unbiased : bool, default True
        Report the variance in PyTorch's convention: ``pooled`` divides the pooled ``M2`` by
        ``N - 1`` instead of ``N``; ``mean_of_batch`` averages ``M2_b / (n_b - 1)`` instead of
        ``M2_b / n_b``. :meth:`running_var` gives either convention.

    Attributes
    ----------
    epochs_seen : list of int
        The epochs that received batches, in order.
    epochs_used : list of int
        The epochs the estimate combines (empty when the drops leave none).

    Notes
    -----
    ``mean_of_batch`` ignores the scatter of the batch means within and across the epochs, so it
    underestimates the variance when batches differ (small batches, drift); ``pooled`` does not.
    Reading :attr:`mean` or :attr:`var` when the drops leave no epoch raises ``ValueError``.
    Epochs passed to :meth:`update` must never decrease.

    Examples
    --------
    >>> import numpy as np, streamnorm
    >>> w = streamnorm.WindowedAverage(drop_first=1, drop_last=1)
    >>> for epoch in range(4):
    ...     _ = w.update(streamnorm.moments(np.full((3, 1), float(epoch))), epoch=epoch)
    >>> w.epochs_used, w.mean.tolist()
    ([1, 2], [1.5])
    """

    _renamed_params: ClassVar[dict[str, str]] = {"mode": "var_mode"}

    _param_names = ("drop_first", "drop_last", "var_mode", "unbiased")

    def __init__(
        self,
        drop_first: int | float = 0.25,
        drop_last: int | float = 0.25,
        var_mode: str = "pooled",
        unbiased: bool = True,
        *,
        mode: str | None = None,
    ) -> None:
        self.drop_first = check_drop("drop_first", drop_first)
        self.drop_last = check_drop("drop_last", drop_last)
        self._drops = (_as_ratio(self.drop_first), _as_ratio(self.drop_last))
        var_mode = renamed_keyword(
            "WindowedAverage", "mode", "var_mode", mode, var_mode, default="pooled"
        )
        self.var_mode = check_choice("var_mode", var_mode, VAR_MODES)
        self.unbiased = check_bool("unbiased", unbiased)
        super().__init__()

    #: Deprecated name of :attr:`var_mode` (``"pooled"`` or ``"mean_of_batch"``).
    mode = renamed_attribute("WindowedAverage", "mode", "var_mode")

    @property
    def min_batch_count(self) -> int:
        if self.var_mode == "pooled":
            return 0
        return 2 if self.unbiased else 1

    # per-epoch rows: pooled -> (count, mean, m2); mean_of_batch -> (sum_mean, sum_u, sum_v)
    def _clear_state(self) -> None:
        self._init_state(0)

    def _init_state(self, D: int) -> None:
        self._D = D
        self._cache: tuple[np.ndarray, np.ndarray, np.ndarray, float] | None = None
        self._epochs: list[int] = []
        self._nb: list[int] = []
        self._rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def _check_epoch_order(self, epoch: int) -> None:
        if self._epochs and epoch < self._epochs[-1]:
            raise ValueError(
                f"epochs must not go backwards: got epoch {epoch} after epoch {self._epochs[-1]}"
            )

    def _new_row(self, epoch: int) -> None:
        self._epochs.append(epoch)
        self._nb.append(0)
        self._rows.append((np.zeros(self._D), np.zeros(self._D), np.zeros(self._D)))

    def _apply(
        self, n: np.ndarray, mu: np.ndarray, m2: np.ndarray, epochs: np.ndarray, uniform: bool
    ) -> None:
        self._cache = None
        k = mu.shape[0]
        i = 0
        while i < k:
            e = int(epochs[i])
            j = i + 1
            while j < k and epochs[j] == e:
                j += 1
            if not self._epochs or self._epochs[-1] != e:
                self._new_row(e)
            a, b, c = self._rows[-1]
            if self.var_mode == "pooled":
                EK.chan_rows(n[i:j], mu[i:j], m2[i:j], a, b, c, uniform)
            else:
                EK.sums_rows(n[i:j], mu[i:j], m2[i:j], a, b, c, uniform)
            self._nb[-1] += j - i
            i = j

    # ---- the window
    @property
    def epochs_seen(self) -> list[int]:
        self._sync()
        return list(self._epochs)

    def _window(self) -> range:
        E = len(self._epochs)
        lo, hi = ((d if isinstance(d, int) else (d[0] * E) // d[1]) for d in self._drops)
        return range(lo, E - hi) if lo + hi < E else range(0)

    @property
    def epochs_used(self) -> list[int]:
        self._sync()
        return [self._epochs[i] for i in self._window()]

    def _combine(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        if self._cache is None:
            self._cache = self._combine_window()
        return self._cache

    def _combine_window(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        w = self._window()
        if len(w) == 0:
            E = len(self._epochs)
            raise ValueError(
                f"WindowedAverage: {E} epoch(s) seen and drop_first={self.drop_first!r}, "
                f"drop_last={self.drop_last!r} leave none; feed more epochs or drop fewer"
            )
        D = self._D
        if self.var_mode == "pooled":
            n, m, q = np.zeros(D), np.zeros(D), np.zeros(D)
            for i in w:
                chan_merge_into(n, m, q, *self._rows[i])
            return n, m, q, 0.0
        s_mu, s_u, s_v = np.zeros(D), np.zeros(D), np.zeros(D)
        nb = 0
        for i in w:
            a, b, c = self._rows[i]
            s_mu += a
            s_u += b
            s_v += c
            nb += self._nb[i]
        return s_mu / nb, s_u / nb, s_v / nb, float(nb)

    def _mean_flat(self) -> np.ndarray:
        a, b, _, _ = self._combine()
        if self.var_mode == "pooled":
            return np.where(a > 0, b, np.nan)
        return a

    def _var_flat(self, convention: str) -> np.ndarray:
        a, b, c, _ = self._combine()
        if self.var_mode == "mean_of_batch":
            return b if convention == "unbiased" else c
        den = a - (1.0 if convention == "unbiased" else 0.0)
        out = np.full(a.shape, np.nan)
        np.divide(c, den, out=out, where=den > 0)
        return out

    # ---- serialization and merging
    def _row_names(self) -> tuple[str, str, str]:
        if self.var_mode == "pooled":
            return ("count", "mean", "m2")
        return ("sum_mean", "sum_var_unbiased", "sum_var_biased")

    def _state(self) -> dict[str, Any]:
        E, D = len(self._epochs), self._D
        rows = [np.array([r[j] for r in self._rows]).reshape(E, D) for j in range(3)]
        out = {
            "epochs": np.asarray(self._epochs, dtype=np.int64),
            "epoch_batches": np.asarray(self._nb, dtype=np.int64),
        }
        names = self._row_names()
        for name, r in zip(names, rows, strict=True):
            out["epoch_" + name] = r
        return out

    def _set_state(self, d: Any, D: int) -> None:
        if "epochs" not in d or "epoch_batches" not in d:
            raise RecordError("corrupt estimator record: missing the epochs of a WindowedAverage")
        E = int(np.size(d["epochs"]))
        epochs = state_array(d, "epochs", (E,), integer=True).astype(np.int64)
        nb = state_array(d, "epoch_batches", (E,), integer=True).astype(np.int64)
        if np.any(np.diff(epochs) <= 0):
            raise RecordError("corrupt estimator record: epochs must be increasing and >= 0")
        names = self._row_names()
        rows = [state_array(d, "epoch_" + name, (E, D)) for name in names]
        self._cache = None
        self._epochs = [int(e) for e in epochs]
        self._nb = [int(b) for b in nb]
        self._rows = [(rows[0][i].copy(), rows[1][i].copy(), rows[2][i].copy()) for i in range(E)]

    def merge(self, other: Estimator) -> WindowedAverage:
        """A new WindowedAverage with both inputs' batches, epoch by epoch.

        Typical use: the estimators of data-parallel workers that saw different batches of the
        same epochs.
        """
        self._merge_check(other)
        other = cast(WindowedAverage, other)
        self._sync()
        other._sync()
        out = cast(WindowedAverage, self._merge_base(other))
        D = self._D if self._shape is not None else other._D
        out._init_state(D)
        by_epoch: dict[int, list[int]] = {}
        for src in (self, other):
            for e, nb, row in zip(src._epochs, src._nb, src._rows, strict=True):
                if e not in by_epoch:
                    by_epoch[e] = [len(out._epochs)]
                    out._epochs.append(e)
                    out._nb.append(0)
                    out._rows.append((np.zeros(D), np.zeros(D), np.zeros(D)))
                i = by_epoch[e][0]
                out._nb[i] += nb
                a, b, c = out._rows[i]
                if self.var_mode == "pooled":
                    chan_merge_into(a, b, c, *row)
                else:
                    a += row[0]
                    b += row[1]
                    c += row[2]
        order = sorted(range(len(out._epochs)), key=lambda i: out._epochs[i])
        out._epochs = [out._epochs[i] for i in order]
        out._nb = [out._nb[i] for i in order]
        out._rows = [out._rows[i] for i in order]
        return out
