"""CQI, convergence epoch and phase markers against independent hand computations."""

import json
import logging
import math
from fractions import Fraction

import chex
import numpy as np
import pytest

from fmcejax import cqi as cqi_lib


def _reference_cqi(losses, beta, window):
  """Literal loop transcription of METHOD.md step 2 (1-based epochs, None where undefined)."""
  s = {1: losses[0]}
  for t in range(2, len(losses) + 1):
    s[t] = beta * s[t - 1] + (1 - beta) * losses[t - 1]
  d = {t: s[t] - s[t - 1] for t in range(2, len(losses) + 1)}
  out = []
  for t in range(1, len(losses) + 1):
    ts = range(t - window + 1, t + 1)
    out.append(abs(sum(d[u] for u in ts) / window) if all(u in d for u in ts) else None)
  return out


def test_cqi_matches_literal_loop():
  losses = list(np.random.default_rng(0).uniform(0.1, 3.0, size=23))
  got = cqi_lib.cqi(losses, beta=0.8, window=4)
  ref = _reference_cqi(losses, beta=0.8, window=4)
  assert got.shape == (23,)
  assert np.isnan(got[:4]).all()
  chex.assert_trees_all_close(got[4:], np.array(ref[4:], dtype=np.float64), rtol=1e-12, atol=1e-15)


def test_exponential_decay_converges_at_closed_form_epoch():
  a, tau, c, beta, window, mu_rel = 2.0, 8.0, 0.3, 0.9, 5, 1e-3
  epochs = 200
  r = math.exp(-1 / tau)
  q = beta / r
  losses = [a * r**t + c for t in range(1, epochs + 1)]

  # Closed form of the EMA of c + a r^t with S_1 = L_1:
  # S_t = c + a * (beta^(t-1) r + (1-beta) r^t (1 - q^(t-1)) / (1 - q)), q = beta / r.
  def s(t):
    return c + a * (beta ** (t - 1) * r + (1 - beta) * r**t * (1 - q ** (t - 1)) / (1 - q))

  assert s(1) == pytest.approx(losses[0])
  mu = mu_rel * s(1)
  # The window mean of D telescopes: mean(D_{t-w+1..t}) = (S_t - S_{t-w}) / w, defined for t >= w+1.
  expected = next(
    t for t in range(window + 1, epochs + 1) if abs(s(t) - s(t - window)) / window < mu
  )

  conv = cqi_lib.analyse(losses, beta=beta, window=window, mu_rel=mu_rel, k=5)
  assert conv.converged
  assert conv.converged_epoch == expected
  assert conv.threshold == pytest.approx(mu)
  assert conv.markers[-1] == expected
  assert cqi_lib.converged_epoch(conv.cqi, mu) == expected
  assert not np.any(conv.cqi[: expected - 1] < mu)


def test_constant_loss_cannot_converge_before_the_window_fills():
  conv = cqi_lib.analyse([1.0] * 12, window=5, k=5)
  assert np.isnan(conv.cqi[:5]).all()
  chex.assert_trees_all_close(conv.cqi[5:], np.zeros(7))
  assert conv.converged and conv.converged_epoch == 6


def test_noisy_plateau_converges_sensibly():
  rng = np.random.default_rng(1234)
  t = np.arange(1, 101)
  losses = 0.2 + 2.0 * np.exp(-t / 4.0) + rng.normal(0.0, 0.002, size=t.size)
  conv = cqi_lib.analyse(losses, beta=0.9, window=5, mu_rel=1e-3, k=5)
  assert conv.converged
  # Not before the window is full, and not while the loss still falls steeply (first ~20 epochs).
  assert conv.converged_epoch >= 20
  assert conv.converged_epoch < 80
  assert np.isnan(conv.cqi[:5]).all() and np.isfinite(conv.cqi[5:]).all()
  assert conv.cqi[conv.converged_epoch - 1] < conv.threshold
  assert len(conv.markers) == 5 and conv.markers[-1] == conv.converged_epoch


def test_linear_decrease_never_converges_and_falls_back(caplog):
  losses = [2.0 - 0.01 * t for t in range(1, 51)]
  with caplog.at_level(logging.WARNING, logger="fmcejax.cqi"):
    with pytest.warns(cqi_lib.NotConvergedWarning, match="never converged"):
      conv = cqi_lib.analyse(losses, k=5)
  assert not conv.converged
  assert conv.converged_epoch == 50
  assert conv.markers == (10, 20, 30, 40, 50)
  assert "never converged" in caplog.text and "T = 50" in caplog.text
  assert cqi_lib.converged_epoch(conv.cqi, conv.threshold) is None


@pytest.mark.parametrize(
  "t_c, k, expected",
  [
    (10, 5, (2, 4, 6, 8, 10)),
    (7, 5, (1, 3, 4, 6, 7)),  # 1.4, 2.8, 4.2, 5.6, 7
    (12, 4, (3, 6, 9, 12)),
    (5, 5, (1, 2, 3, 4, 5)),
    (15, 6, (3, 5, 8, 10, 13, 15)),  # 2.5 -> 3 and 12.5 -> 13: half-up, not half-even
    (5, 2, (3, 5)),
    (9, 1, (9,)),
  ],
)
def test_phase_markers(t_c, k, expected):
  assert cqi_lib.phase_markers(t_c, k) == expected


def test_phase_markers_are_increasing_half_up_for_all_small_cases():
  for k in range(1, 12):
    for t_c in range(k, 60):
      markers = cqi_lib.phase_markers(t_c, k)
      ref = tuple(math.floor(Fraction(i * t_c, k) + Fraction(1, 2)) for i in range(1, k + 1))
      assert markers == ref
      assert markers[0] >= 1 and markers[-1] == t_c
      assert all(b > a for a, b in zip(markers, markers[1:]))


def test_phase_markers_rejects_fewer_epochs_than_phases():
  with pytest.raises(ValueError, match="T_c=3 is smaller than the number of phases K=5"):
    cqi_lib.phase_markers(3, 5)
  with pytest.raises(ValueError):
    cqi_lib.phase_markers(3, 0)


def test_invalid_inputs():
  with pytest.raises(ValueError):
    cqi_lib.cqi([])
  with pytest.raises(ValueError):
    cqi_lib.cqi([1.0, 2.0], window=0)
  with pytest.raises(ValueError):
    cqi_lib.cqi([1.0, 2.0], beta=1.0)
  with pytest.raises(ValueError):
    cqi_lib.analyse([0.0, 1.0])


def test_to_json_round_trip():
  losses = [3.0, 2.0, 1.5, 1.2, 1.1, 1.05, 1.02, 1.01, 1.005, 1.0]
  conv = cqi_lib.analyse(losses, window=3, mu_rel=0.2, k=2)
  payload = cqi_lib.to_json(conv, losses)
  assert set(payload) == {
    "losses",
    "cqi",
    "converged_epoch",
    "markers",
    "converged",
    "threshold",
    "beta",
    "window",
  }
  back = json.loads(json.dumps(payload, allow_nan=False))
  assert back == payload
  assert back["cqi"][:3] == [None, None, None]
  assert all(isinstance(x, float) for x in back["cqi"][3:])
  assert back["losses"] == losses
  assert back["converged_epoch"] == conv.converged_epoch and back["markers"] == list(conv.markers)
  assert back["converged"] is True and back["beta"] == 0.9 and back["window"] == 3
