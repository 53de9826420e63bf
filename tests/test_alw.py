"""Tests for ``alw.py``: the adaptive loss weighting schedule of AICSD.

alpha = clip(current / total, 0, 1)
loss  = alpha * (ce + lambda_ics * ics) + (1 - alpha) * lambda_kd * kd
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from alw import alw_alpha, alw_combine, fixed_combine  # noqa: E402


# --------------------------------------------------------------------------------------
# alpha schedule
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("total", [1, 4, 7, 10])
def test_alpha_every_epoch_of_a_small_schedule(total):
    for current in range(0, total + 4):
        a = alw_alpha(current, total)
        assert isinstance(a, float)
        expected = min(current / total, 1.0)
        assert a == pytest.approx(expected, rel=0, abs=1e-15), (current, total, a)


def test_alpha_endpoints_and_clipping():
    assert alw_alpha(0, 10) == 0.0
    assert alw_alpha(10, 10) == 1.0
    assert alw_alpha(11, 10) == 1.0
    assert alw_alpha(10_000, 10) == 1.0
    assert alw_alpha(-1, 10) == 0.0
    assert alw_alpha(-50, 10) == 0.0


def test_alpha_uses_float_division_and_is_monotone():
    assert alw_alpha(1, 3) == pytest.approx(1 / 3, abs=1e-15)
    assert alw_alpha(2, 3) == pytest.approx(2 / 3, abs=1e-15)
    # per optimizer step over a longer schedule
    total = 1000
    values = [alw_alpha(k, total) for k in range(total + 5)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert values[0] == 0.0 and values[500] == pytest.approx(0.5) and values[-1] == 1.0
    assert all(0.0 <= v <= 1.0 for v in values)


@pytest.mark.parametrize("total", [0, -1, -10, 0.0])
def test_alpha_rejects_nonpositive_total(total):
    with pytest.raises(ValueError):
        alw_alpha(0, total)
    with pytest.raises(ValueError):
        alw_alpha(3, total)


# --------------------------------------------------------------------------------------
# combination
# --------------------------------------------------------------------------------------


def _is_log_value(v):
    """A logging term is a Python float or a detached 0-dim tensor (no graph kept alive, no forced sync)."""
    if isinstance(v, float):
        return True
    return isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad


def _leaves(ce=1.3, ics=0.4, kd=2.1, dtype=torch.float32):
    return tuple(torch.tensor(v, dtype=dtype, requires_grad=True) for v in (ce, ics, kd))


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("lambdas", [(1.0, 1.0), (50.0, 10.0), (0.0, 3.0), (2.5, 0.0)])
def test_alw_combine_formula_and_gradients(alpha, lambdas):
    l_ics, l_kd = lambdas
    ce, ics, kd = _leaves(dtype=torch.float64)
    loss, terms = alw_combine(ce, ics, kd, alpha, l_ics, l_kd)
    expected = alpha * (1.3 + l_ics * 0.4) + (1 - alpha) * l_kd * 2.1
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    loss.backward()
    assert float(ce.grad) == pytest.approx(alpha, abs=1e-12)
    assert float(ics.grad) == pytest.approx(alpha * l_ics, abs=1e-12)
    assert float(kd.grad) == pytest.approx((1 - alpha) * l_kd, abs=1e-12)

    for key in ("ce", "ics", "kd", "alpha"):
        assert key in terms, f"missing log term {key!r}"
    for key in ("ce", "ics", "kd"):
        assert _is_log_value(terms[key]), f"terms[{key!r}] should be a float or detached scalar, got {terms[key]!r}"
    assert isinstance(terms["alpha"], float)
    assert terms["alpha"] == pytest.approx(alpha, abs=1e-15)
    assert float(terms["ce"]) == pytest.approx(alpha * 1.3, abs=1e-12)
    assert float(terms["ics"]) == pytest.approx(alpha * l_ics * 0.4, abs=1e-12)
    assert float(terms["kd"]) == pytest.approx((1 - alpha) * l_kd * 2.1, abs=1e-12)
    total = float(terms["ce"]) + float(terms["ics"]) + float(terms["kd"])
    assert total == pytest.approx(float(loss.detach()), rel=1e-12, abs=1e-12)


def test_alw_combine_float32_keeps_graph_and_dtype():
    ce, ics, kd = _leaves()
    loss, _ = alw_combine(ce, ics, kd, alw_alpha(3, 10), 50.0, 10.0)
    assert loss.dtype == torch.float32 and loss.requires_grad
    loss.backward()
    torch.testing.assert_close(ce.grad, torch.tensor(0.3))
    torch.testing.assert_close(ics.grad, torch.tensor(0.3 * 50.0))
    torch.testing.assert_close(kd.grad, torch.tensor(0.7 * 10.0))


def test_alw_combine_with_python_floats():
    loss, terms = alw_combine(1.3, 0.4, 2.1, 0.25, 10.0, 2.0)
    assert float(loss) == pytest.approx(0.25 * (1.3 + 4.0) + 0.75 * 2.0 * 2.1, rel=1e-12)
    assert float(terms["kd"]) == pytest.approx(0.75 * 2.0 * 2.1, rel=1e-12)


def test_alw_combine_ends_of_schedule():
    """At alpha=0 only distillation (KD) is active; at alpha=1 KD is switched off."""
    ce, ics, kd = _leaves()
    loss0, _ = alw_combine(ce, ics, kd, alw_alpha(0, 5), 2.0, 3.0)
    assert float(loss0.detach()) == pytest.approx(3.0 * 2.1, rel=1e-6)
    loss1, _ = alw_combine(ce, ics, kd, alw_alpha(5, 5), 2.0, 3.0)
    assert float(loss1.detach()) == pytest.approx(1.3 + 2.0 * 0.4, rel=1e-6)


def test_alw_combine_gradients_reach_upstream_parameters():
    """Gradients reach the parameters that produced the three terms with the right weights."""
    w = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    ce = (w[0] ** 2)
    ics = (w[1] ** 2)
    kd = (w[2] ** 2)
    alpha, l_ics, l_kd = 0.4, 5.0, 7.0
    loss, _ = alw_combine(ce, ics, kd, alpha, l_ics, l_kd)
    loss.backward()
    expected = torch.tensor([alpha * 2 * 0.5, alpha * l_ics * 2 * -1.0, (1 - alpha) * l_kd * 2 * 2.0], dtype=torch.float64)
    torch.testing.assert_close(w.grad, expected)


@pytest.mark.parametrize("lambdas", [(1.0, 1.0), (50.0, 10.0), (0.0, 0.0)])
def test_fixed_combine(lambdas):
    l_ics, l_kd = lambdas
    ce, ics, kd = _leaves(dtype=torch.float64)
    loss, terms = fixed_combine(ce, ics, kd, l_ics, l_kd)
    assert float(loss.detach()) == pytest.approx(1.3 + l_ics * 0.4 + l_kd * 2.1, rel=1e-12, abs=1e-12)
    loss.backward()
    assert float(ce.grad) == pytest.approx(1.0)
    assert float(ics.grad) == pytest.approx(l_ics)
    assert float(kd.grad) == pytest.approx(l_kd)
    assert "alpha" not in terms
    for key in ("ce", "ics", "kd"):
        assert _is_log_value(terms[key]), f"terms[{key!r}] should be a float or detached scalar, got {terms[key]!r}"
    assert float(terms["ce"]) == pytest.approx(1.3, abs=1e-12)
    assert float(terms["ics"]) == pytest.approx(l_ics * 0.4, abs=1e-12)
    assert float(terms["kd"]) == pytest.approx(l_kd * 2.1, abs=1e-12)


def test_alw_matches_fixed_at_alpha_one_without_kd():
    ce, ics, kd = _leaves()
    a, _ = alw_combine(ce, ics, kd, 1.0, 4.0, 9.0)
    f, _ = fixed_combine(ce, ics, kd, 4.0, 0.0)
    assert math.isclose(float(a.detach()), float(f.detach()), rel_tol=1e-6)
