"""CQI (Convergence Quantification Indicator) and the K phase markers: METHOD.md steps 2-3.

These run once per pipeline on a host-side loss sequence of a few hundred floats, so they are plain
numpy. FMCS scores and predictions live in ``steps`` (they run inside the jitted step).

Epochs are 1-based throughout, as in METHOD.md: ``losses[0]`` is L_1, ``cqi_values[0]`` is CQI_1.

Decisions (all [choice], METHOD.md leaves them open):

* CQI_t averages D_{t-w+1..t} and D_1 does not exist, so CQI_t is defined only from t = w + 1 on.
  Earlier entries are NaN ("not yet defined"): a NaN never compares below the threshold, so a run
  can never count as converged before one full window of differences exists. JSON writes them as
  null.
* Markers use round-half-up, e_k = floor(k*T_c/K + 1/2), computed in exact integer arithmetic,
  instead of Python's round-half-even, so the rule does not depend on the parity of the result.
* With T_c >= K consecutive markers are >= 1 epoch apart, so round-half-up makes them strictly
  increasing, e_1 >= 1 and e_K = T_c. With T_c < K there cannot be K distinct checkpoints:
  ``phase_markers`` raises ValueError rather than silently duplicating or inventing epochs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger(__name__)


class NotConvergedWarning(UserWarning):
  """The loss never brought CQI below its threshold; T_c fell back to the last epoch."""


@dataclasses.dataclass(frozen=True)
class Convergence:
  """Result of ``analyse``: the CQI curve, the converged epoch T_c and the K phase markers.

  ``converged_epoch`` is always an epoch (1-based) usable for the markers; ``converged`` tells
  whether it is a real convergence or the fallback T_c = T.
  """

  cqi: np.ndarray
  converged_epoch: int
  converged: bool
  threshold: float
  markers: tuple[int, ...]
  beta: float
  window: int


def _check_losses(losses: Sequence[float]) -> np.ndarray:
  values = np.asarray(losses, dtype=np.float64)
  if values.ndim != 1 or values.size == 0:
    raise ValueError(
      f"losses must be a non-empty 1-D sequence of per-epoch losses, got shape {values.shape}"
    )
  return values


def smoothed(losses: Sequence[float], beta: float = 0.9) -> np.ndarray:
  """EMA S_1 = L_1, S_t = beta*S_{t-1} + (1-beta)*L_t (no bias correction: S_1 is L_1 itself)."""
  if not 0.0 <= beta < 1.0:
    raise ValueError(f"beta must be in [0, 1), got {beta}")
  values = _check_losses(losses)
  s = np.empty_like(values)
  s[0] = values[0]
  for t in range(1, values.size):
    s[t] = beta * s[t - 1] + (1.0 - beta) * values[t]
  return s


def cqi(losses: Sequence[float], beta: float = 0.9, window: int = 5) -> np.ndarray:
  """CQI_t = |mean(D_{t-w+1..t})| with D_t = S_t - S_{t-1}; NaN for t <= w (window not full).

  Returns one float64 per epoch, aligned with ``losses``.
  """
  if window < 1:
    raise ValueError(f"window must be >= 1, got {window}")
  s = smoothed(losses, beta)
  out = np.full(s.shape, np.nan)
  d = np.diff(s)  # d[i] = D_{i+2}
  if d.size >= window:
    # Mean of D over the window telescopes to (S_t - S_{t-w}) / w; the explicit window mean
    # keeps the code a literal transcription of METHOD.md.
    sums = np.convolve(d, np.ones(window), mode="valid")  # sums[j] = D_{j+2} + ... + D_{j+w+1}
    out[window:] = np.abs(sums / window)
  return out


def converged_epoch(cqi_values: Sequence[float], threshold: float) -> int | None:
  """First epoch t (1-based) with CQI_t < threshold, None if there is none (NaN never counts)."""
  below = np.asarray(cqi_values, dtype=np.float64) < threshold
  if not below.any():
    return None
  return int(np.argmax(below)) + 1


def converged_past(
  losses: Sequence[float], *, beta: float, window: int, mu_rel: float, k: int
) -> bool:
  """Whether a probe may stop now: CQI has converged, at an epoch that leaves room for K markers."""
  t_c = converged_epoch(cqi(losses, beta, window), mu_rel * losses[0])
  return t_c is not None and t_c >= k


def phase_markers(converged_epoch: int, k: int) -> tuple[int, ...]:
  """Epoch markers e_k = round_half_up(k*T_c/K), k = 1..K; strictly increasing, e_K = T_c.

  Raises ValueError when T_c < K: K distinct checkpoints cannot exist then.
  """
  if k < 1:
    raise ValueError(f"number of phases K must be >= 1, got {k}")
  if converged_epoch < k:
    raise ValueError(
      f"converged epoch T_c={converged_epoch} is smaller than the number of phases K={k}: "
      "K distinct checkpoint epochs cannot exist. Train the probe longer, or use fewer phases."
    )
  # floor(i*T/K + 1/2) == (2*i*T + K) // (2*K), exactly, without float rounding.
  return tuple((2 * i * converged_epoch + k) // (2 * k) for i in range(1, k + 1))


def analyse(
  losses: Sequence[float],
  beta: float = 0.9,
  window: int = 5,
  mu_rel: float = 1e-3,
  k: int = 5,
) -> Convergence:
  """CQI, T_c and markers for a probe run; threshold mu = mu_rel * S_1 (relative to the first loss).

  A run that never converges is not an error (the pipeline still needs markers): it warns with
  ``NotConvergedWarning`` and a log warning, and uses T_c = T = len(losses).
  """
  values = _check_losses(losses)
  if not (math.isfinite(values[0]) and values[0] > 0):
    raise ValueError(
      f"the first loss must be finite and positive to set mu = mu_rel * S_1, got {values[0]}"
    )
  threshold = float(mu_rel * values[0])
  cqi_values = cqi(values, beta, window)
  t_c = converged_epoch(cqi_values, threshold)
  converged = t_c is not None
  if not converged:
    t_c = int(values.size)
    message = (
      f"training never converged: CQI stayed >= {threshold:.3g} (mu_rel={mu_rel} x first loss) "
      f"in all {values.size} epochs; T_c falls back to T = {values.size}, the last epoch."
    )
    warnings.warn(message, NotConvergedWarning, stacklevel=2)
    logger.warning(message)
  return Convergence(
    cqi=cqi_values,
    converged_epoch=t_c,
    converged=converged,
    threshold=threshold,
    markers=phase_markers(t_c, k),
    beta=float(beta),
    window=int(window),
  )


def _json_float(x: float) -> float | None:
  return float(x) if math.isfinite(x) else None


def to_json(conv: Convergence, losses: Sequence[float]) -> dict:
  """The ``probe/cqi.json`` payload (CLI.md keys plus converged/threshold/beta/window); NaN -> None."""
  return {
    "losses": [_json_float(x) for x in _check_losses(losses)],
    "cqi": [_json_float(x) for x in conv.cqi],
    "converged_epoch": int(conv.converged_epoch),
    "markers": [int(m) for m in conv.markers],
    "converged": bool(conv.converged),
    "threshold": float(conv.threshold),
    "beta": float(conv.beta),
    "window": int(conv.window),
  }
