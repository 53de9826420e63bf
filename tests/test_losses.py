"""Tests for ``losses.py`` (AICSD: intra-class spatial distillation and baselines).

The reference used here is an independent brute force: after the alignment step
(bilinear resize of the student, nearest resize of the mask, done with
``F.interpolate`` exactly as the spec prescribes) every quantity is computed
with explicit Python loops over images, classes and pixels on Python floats
(IEEE double precision), without any torch softmax / matmul / einsum.

The loss implementation is always fed float32 tensors; the brute force is fed
the float64 copy of the very same values.
"""

from __future__ import annotations

import ast
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import losses

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def L():
    """The module under test."""
    return losses


LOSS_NAMES = ["icsd", "kd", "cwd", "ickd"]
TEMPERATURE_LOSSES = {"icsd", "kd", "cwd"}
MODULE_NAMES = {"icsd": "ICSDLoss", "kd": "KDLoss", "cwd": "CWDLoss", "ickd": "ICKDLoss"}
RTOL = 1e-5
ATOL = 1e-7


def call_loss(L, name, s, t, mask=None, T=1.0):
    fn = getattr(L, f"{name}_loss")
    if name in TEMPERATURE_LOSSES:
        return fn(s, t, valid_mask=mask, temperature=T)
    return fn(s, t, valid_mask=mask)


def assert_close_scalar(got, expected, rtol=RTOL, atol=ATOL, msg=""):
    got = float(got.detach()) if isinstance(got, torch.Tensor) else float(got)
    assert math.isfinite(got), f"{msg}: non-finite value {got}"
    assert abs(got - expected) <= atol + rtol * abs(expected), (
        f"{msg}: got {got!r}, expected {expected!r}, "
        f"abs diff {abs(got - expected):.3e}, rel diff {abs(got - expected) / max(abs(expected), 1e-300):.3e}"
    )


# --------------------------------------------------------------------------------------
# Independent brute force (float64, Python loops)
# --------------------------------------------------------------------------------------


def _align(s, t, mask):
    """Spec step 1, in float64. Returns (s, t, m) with s, t of shape (B, C, H, W) and m (B, H, W) bool."""
    s = s.detach().to(torch.float64)
    t = t.detach().to(torch.float64)
    B, _, H, W = t.shape
    if tuple(s.shape[-2:]) != (H, W):
        s = F.interpolate(s, size=(H, W), mode="bilinear", align_corners=False)
    if mask is None:
        m = torch.ones(B, H, W, dtype=torch.bool)
    else:
        m = mask.detach().bool()
        if tuple(m.shape[-2:]) != (H, W):
            m = F.interpolate(m.float()[:, None], size=(H, W), mode="nearest")[:, 0] > 0.5
    return s, t, m


def _valid_values(x, m):
    """x (B, C, H, W) float64, m (B, H, W) -> per image, per class: list of valid pixel values (Python floats)."""
    B, C, H, W = x.shape
    xs = x.tolist()
    ms = m.tolist()
    out = []
    for b in range(B):
        pix = [(h, w) for h in range(H) for w in range(W) if ms[b][h][w]]
        out.append([[xs[b][c][h][w] for (h, w) in pix] for c in range(C)])
    return out


def _log_softmax(values):
    mx = max(values)
    lse = mx + math.log(sum(math.exp(v - mx) for v in values))
    return [v - lse for v in values]


def _row_normalize_lists(A):
    out = []
    for row in A:
        norm = math.sqrt(sum(a * a for a in row))
        d = max(norm, 1e-12)
        out.append([a / d for a in row])
    return out


def brute_ics_image(vals, T):
    """vals: per class list of valid pixel values for one image. Returns unnormalised C x C KL matrix."""
    C = len(vals)
    logp = [_log_softmax([v / T for v in vals[c]]) for c in range(C)]
    p = [[math.exp(l) for l in logp[c]] for c in range(C)]
    N = len(vals[0])
    A = [[0.0] * C for _ in range(C)]
    for i in range(C):
        pi, li = p[i], logp[i]
        for j in range(C):
            lj = logp[j]
            acc = 0.0
            for n in range(N):
                acc += pi[n] * (li[n] - lj[n])
            A[i][j] = acc
    return A


def brute_icsd(s, t, mask=None, T=1.0):
    s, t, m = _align(s, t, mask)
    sv, tv = _valid_values(s, m), _valid_values(t, m)
    total, counted = 0.0, 0
    C = s.shape[1]
    for b in range(s.shape[0]):
        if len(sv[b][0]) == 0:
            continue
        counted += 1
        As = _row_normalize_lists(brute_ics_image(sv[b], T))
        At = _row_normalize_lists(brute_ics_image(tv[b], T))
        for i in range(C):
            for j in range(C):
                total += (As[i][j] - At[i][j]) ** 2
    return 0.0 if counted == 0 else total / (counted * C * C)


def brute_kd(s, t, mask=None, T=1.0):
    s, t, m = _align(s, t, mask)
    sv, tv = _valid_values(s, m), _valid_values(t, m)
    C = s.shape[1]
    total, count = 0.0, 0
    for b in range(s.shape[0]):
        N = len(sv[b][0])
        for n in range(N):
            ls = _log_softmax([sv[b][c][n] / T for c in range(C)])
            lt = _log_softmax([tv[b][c][n] / T for c in range(C)])
            total += sum(math.exp(lt[c]) * (lt[c] - ls[c]) for c in range(C))
            count += 1
    return 0.0 if count == 0 else T * T * total / count


def brute_cwd(s, t, mask=None, T=1.0):
    s, t, m = _align(s, t, mask)
    sv, tv = _valid_values(s, m), _valid_values(t, m)
    C = s.shape[1]
    total, counted = 0.0, 0
    for b in range(s.shape[0]):
        if len(sv[b][0]) == 0:
            continue
        counted += 1
        for c in range(C):
            ls = _log_softmax([v / T for v in sv[b][c]])
            lt = _log_softmax([v / T for v in tv[b][c]])
            total += T * T * sum(math.exp(lt[n]) * (lt[n] - ls[n]) for n in range(len(lt)))
    return 0.0 if counted == 0 else total / (counted * C)


def _gram_lists(vals):
    C = len(vals)
    G = [[0.0] * C for _ in range(C)]
    for i in range(C):
        for j in range(C):
            acc = 0.0
            for a, b in zip(vals[i], vals[j]):
                acc += a * b
            G[i][j] = acc
    return G


def brute_ickd(s, t, mask=None, T=None):
    s, t, m = _align(s, t, mask)
    sv, tv = _valid_values(s, m), _valid_values(t, m)
    C = s.shape[1]
    total, counted = 0.0, 0
    for b in range(s.shape[0]):
        if len(sv[b][0]) == 0:
            continue
        counted += 1
        Gs = _row_normalize_lists(_gram_lists(sv[b]))
        Gt = _row_normalize_lists(_gram_lists(tv[b]))
        for i in range(C):
            for j in range(C):
                total += (Gs[i][j] - Gt[i][j]) ** 2
    return 0.0 if counted == 0 else total / (counted * C * C)


BRUTE = {"icsd": brute_icsd, "kd": brute_kd, "cwd": brute_cwd, "ickd": brute_ickd}


# --------------------------------------------------------------------------------------
# Test inputs
# --------------------------------------------------------------------------------------


def make_mask(kind, B, Ht, Wt, gen, Hs=None, Ws=None):
    if kind is None:
        return None
    if kind == "random":
        return torch.rand(B, Ht, Wt, generator=gen) < 0.7
    if kind == "other_res_larger":  # labels at a finer, odd resolution than the teacher
        return torch.rand(B, 2 * Ht + 1, 2 * Wt - 1, generator=gen) < 0.7
    if kind == "other_res_student":  # labels at the student's resolution (differs from teacher's)
        return torch.rand(B, Hs, Ws, generator=gen) < 0.7
    if kind == "empty_image":
        m = torch.rand(B, Ht, Wt, generator=gen) < 0.7
        m[1] = False
        return m
    if kind == "empty_image_other_res":
        m = torch.rand(B, Ht + 3, Wt + 2, generator=gen) < 0.7
        m[B - 1] = False
        return m
    if kind == "single":
        m = torch.zeros(B, Ht, Wt, dtype=torch.bool)
        for b in range(B):
            k = int(torch.randint(0, Ht * Wt, (1,), generator=gen))
            m[b, k // Wt, k % Wt] = True
        return m
    raise ValueError(kind)


# (B, C, Hs, Ws, Ht, Wt, mask kind, T, seed)
CASES = [
    (1, 2, 8, 10, 8, 10, None, 1.0, 0),
    (3, 2, 11, 6, 5, 4, "other_res_larger", 2.0, 1),
    (3, 5, 6, 9, 6, 9, "random", 2.0, 2),
    (3, 5, 9, 8, 9, 8, "single", 1.0, 3),
    (1, 5, 12, 12, 12, 11, "single", 4.0, 4),
    (3, 19, 5, 7, 10, 12, "random", 4.0, 5),
    (1, 19, 12, 11, 6, 7, "other_res_larger", 1.0, 6),
    (3, 19, 4, 6, 7, 9, "other_res_student", 2.0, 7),
    (3, 21, 7, 5, 9, 11, "empty_image", 2.0, 8),
    (1, 21, 10, 12, 10, 12, "random", 4.0, 9),
    (3, 21, 9, 7, 6, 5, "empty_image_other_res", 1.0, 10),
    (1, 150, 4, 5, 4, 5, None, 1.0, 11),
    (3, 150, 3, 3, 3, 4, "random", 2.0, 12),
    (1, 150, 6, 5, 4, 3, "other_res_larger", 4.0, 13),
]


def case_id(c):
    B, C, Hs, Ws, Ht, Wt, kind, T, _ = c
    return f"B{B}-C{C}-s{Hs}x{Ws}-t{Ht}x{Wt}-{kind}-T{T:g}"


def make_case(case):
    B, C, Hs, Ws, Ht, Wt, kind, T, seed = case
    gen = torch.Generator().manual_seed(1000 + seed)
    s = torch.randn(B, C, Hs, Ws, generator=gen) * 3
    t = torch.randn(B, C, Ht, Wt, generator=gen) * 3
    mask = make_mask(kind, B, Ht, Wt, gen, Hs, Ws)
    return s, t, mask, T


_BRUTE_CACHE: dict = {}


def brute_cached(name, case):
    key = (name, case)
    if key not in _BRUTE_CACHE:
        s, t, mask, T = make_case(case)
        _BRUTE_CACHE[key] = BRUTE[name](s, t, mask, T)
    return _BRUTE_CACHE[key]


def small_inputs(B=2, C=5, Hs=6, Ws=7, Ht=6, Wt=7, seed=0, scale=3.0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    s = (torch.randn(B, C, Hs, Ws, generator=gen) * scale).to(dtype)
    t = (torch.randn(B, C, Ht, Wt, generator=gen) * scale).to(dtype)
    return s, t


# --------------------------------------------------------------------------------------
# Sanity of the brute force itself (runs without losses.py)
# --------------------------------------------------------------------------------------


def _vec_icsd(s, t, mask=None, T=1.0, mutation=None, dtype=torch.float32):
    """A vectorised ICSD written in the test file. mutation=None is a correct variant used to
    cross-check the brute force; the other values are deliberately wrong variants."""
    s, t, m = _align(s, t, mask)
    use_m = torch.ones_like(m) if mutation == "mask_ignored" else m

    def ics(x):
        z = x.to(dtype) / T
        B, C, H, W = z.shape
        if mutation == "height_softmax":  # softmax over H only (per column) instead of over all pixels
            logp = F.log_softmax(z, dim=2).flatten(2)
        else:
            z = z.masked_fill(~use_m[:, None], float("-inf")).flatten(2)
            logp = F.log_softmax(z, dim=-1)
        mm = use_m.flatten(1)[:, None, :].expand_as(logp)
        p = logp.exp().masked_fill(~mm, 0.0)
        logp = logp.masked_fill(~mm, 0.0)
        logq = p if mutation == "probs_for_logprobs" else logp
        A = (p * logq).sum(-1)[:, :, None] - torch.einsum("bin,bjn->bij", p, logq)
        if mutation == "symmetrised":
            A = 0.5 * (A + A.transpose(1, 2))
        return A / A.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    counted = m.flatten(1).any(1)
    if not bool(counted.any()):
        return 0.0
    d = (ics(s) - ics(t))[counted]
    return float((d * d).mean())


@pytest.mark.parametrize("case", [c for c in CASES if c[1] <= 21], ids=case_id)
def test_brute_force_agrees_with_independent_vectorised_icsd(case):
    """Two different computation paths (loops on doubles vs. float32 einsum) agree to 1e-5."""
    s, t, mask, T = make_case(case)
    assert_close_scalar(_vec_icsd(s, t, mask, T), brute_cached("icsd", case), msg="vectorised ICSD vs brute")


@pytest.mark.parametrize(
    "mutation, mask_kind",
    [
        ("height_softmax", None),
        ("probs_for_logprobs", None),
        ("probs_for_logprobs", "random"),
        ("symmetrised", None),
        ("symmetrised", "random"),
        ("mask_ignored", "random"),
    ],
)
def test_brute_force_detects_mutations(mutation, mask_kind):
    """The brute force can tell deliberately wrong ICSD variants apart."""
    case = (2, 5, 7, 6, 7, 6, mask_kind, 2.0, 77)
    s, t, mask, T = make_case(case)
    ref = brute_icsd(s, t, mask, T)
    good = _vec_icsd(s, t, mask, T, dtype=torch.float64)
    bad = _vec_icsd(s, t, mask, T, mutation=mutation, dtype=torch.float64)
    assert abs(good - ref) <= 1e-9 * abs(ref)
    assert abs(bad - ref) > 1e-3 * abs(ref), f"mutation {mutation} went unnoticed: {bad} vs {ref}"


def test_brute_kd_detects_ignored_mask_and_missing_T2():
    s, t, mask, T = make_case((2, 5, 7, 6, 7, 6, "random", 2.0, 78))
    ref = brute_kd(s, t, mask, T)
    assert abs(brute_kd(s, t, None, T) - ref) > 1e-3 * ref
    assert abs(ref / (T * T) - ref) > 1e-3 * ref
    # KD direction: KL(teacher || student), not the reverse
    assert abs(brute_kd(t, s, mask, T) - ref) > 1e-3 * ref


def test_brute_ics_matrix_known_values():
    # two classes, two pixels: P0 = softmax([0, log 3]) = [1/4, 3/4], P1 = [1/2, 1/2]
    vals = [[0.0, math.log(3.0)], [0.0, 0.0]]
    A = brute_ics_image(vals, 1.0)
    kl01 = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    kl10 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert A[0][0] == 0.0 and A[1][1] == 0.0
    assert abs(A[0][1] - kl01) < 1e-15 and abs(A[1][0] - kl10) < 1e-15


# --------------------------------------------------------------------------------------
# Agreement with the brute force
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_matches_brute_force(L, name, case):
    s, t, mask, T = make_case(case)
    got = call_loss(L, name, s, t, mask, T)
    assert isinstance(got, torch.Tensor) and got.dim() == 0 and got.dtype == torch.float32
    assert_close_scalar(got, brute_cached(name, case), msg=f"{name} {case_id(case)}")


@pytest.mark.parametrize("case", [c for c in CASES if c[1] in (5, 19, 21)], ids=case_id)
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_matches_brute_force_tightly_in_float64(L, name, case):
    """float64 inputs stay float64, so the agreement must then be near machine precision."""
    s, t, mask, T = make_case(case)
    got = call_loss(L, name, s.double(), t.double(), mask, T)
    assert got.dtype == torch.float64
    assert_close_scalar(got, brute_cached(name, case), rtol=1e-9, atol=1e-13, msg=f"{name} float64 {case_id(case)}")


@pytest.mark.parametrize("case", [c for c in CASES if c[6] in (None, "random", "single") and c[1] <= 21], ids=case_id)
def test_ics_matrix_matches_brute_force(L, case):
    _, t, mask, T = make_case(case)
    if mask is not None and tuple(mask.shape[-2:]) != tuple(t.shape[-2:]):
        pytest.skip("ics_matrix is tested at the mask's resolution only")
    A = L.ics_matrix(t, valid_mask=mask, temperature=T)
    B, C = t.shape[:2]
    assert tuple(A.shape) == (B, C, C)
    _, t64, m = _align(t, t, mask)
    tv = _valid_values(t64, m)
    for b in range(B):
        ref = torch.tensor(brute_ics_image(tv[b], T), dtype=torch.float64)
        scale = float(ref.abs().max())
        torch.testing.assert_close(A[b].double(), ref, rtol=1e-5, atol=1e-6 * max(scale, 1.0))


def test_ics_matrix_properties(L):
    s, _ = small_inputs(B=2, C=6, Hs=7, Ws=5, seed=3)
    mask = torch.rand(2, 7, 5, generator=torch.Generator().manual_seed(4)) < 0.6
    for m in (None, mask):
        for T in (1.0, 2.0, 4.0):
            A = L.ics_matrix(s, valid_mask=m, temperature=T)
            diag = torch.diagonal(A, dim1=1, dim2=2)
            assert float(diag.abs().max()) <= 1e-6
            assert float(A.min()) >= -1e-6, "KL divergences must be non-negative"
            asym = float((A - A.transpose(1, 2)).abs().max())
            assert asym > 1e-3 * float(A.abs().max()), "ICS matrix should be asymmetric in general"


def test_row_normalize(L):
    gen = torch.Generator().manual_seed(5)
    A = torch.rand(3, 4, 4, generator=gen) * 5
    A[1, 2] = 0.0  # a zero row stays zero (division by max(norm, 1e-12))
    A[2, 0] = 1e-14  # a tiny row is divided by 1e-12, not by its own norm
    R = L.row_normalize(A)
    expected = A / A.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    assert R.shape == A.shape
    torch.testing.assert_close(R, expected, rtol=1e-6, atol=1e-12)
    assert float(R[1, 2].abs().max()) == 0.0
    norms = R.norm(dim=-1)
    torch.testing.assert_close(norms[0], torch.ones(4), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------


GRADCHECK_CONFIGS = [
    # (B, C, Hs, Ws, Ht, Wt, mask kind, T)
    (2, 3, 3, 4, 3, 4, None, 1.0),
    (2, 4, 2, 3, 4, 5, "random", 2.0),
    (1, 3, 5, 4, 3, 3, "other_res_larger", 4.0),
]


@pytest.mark.parametrize("cfg", GRADCHECK_CONFIGS, ids=lambda c: f"s{c[2]}x{c[3]}-t{c[4]}x{c[5]}-{c[6]}-T{c[7]:g}")
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_gradcheck_wrt_student(L, name, cfg):
    B, C, Hs, Ws, Ht, Wt, kind, T = cfg
    gen = torch.Generator().manual_seed(11)
    s = (torch.randn(B, C, Hs, Ws, generator=gen, dtype=torch.float64) * 2).requires_grad_(True)
    t = torch.randn(B, C, Ht, Wt, generator=gen, dtype=torch.float64) * 2
    mask = make_mask(kind, B, Ht, Wt, gen)
    if mask is not None:
        mask.view(B, -1)[:, 0] = True  # keep every image counted
    out = call_loss(L, name, s, t, mask, T)
    assert out.dtype == torch.float64, "float64 inputs are expected to stay float64"
    assert torch.autograd.gradcheck(
        lambda x: call_loss(L, name, x, t, mask, T), (s,), eps=1e-6, atol=1e-6, rtol=1e-4
    )


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_teacher_never_gets_gradients(L, name):
    s, t = small_inputs(Hs=4, Ws=5, seed=12)
    s.requires_grad_(True)
    t.requires_grad_(True)
    out = call_loss(L, name, s, t, None, 2.0)
    out.backward()
    assert t.grad is None, "the teacher must be detached"
    assert s.grad is not None and bool(torch.isfinite(s.grad).all())
    # a teacher that requires grad with a student that does not: nothing to differentiate
    t2 = t.detach().clone().requires_grad_(True)
    out2 = call_loss(L, name, s.detach(), t2, None, 2.0)
    assert not out2.requires_grad
    torch.testing.assert_close(out2, out.detach())


# --------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_kind", [None, "random"])
@pytest.mark.parametrize("T", [1.0, 4.0])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_zero_when_student_equals_teacher(L, name, T, mask_kind):
    gen = torch.Generator().manual_seed(13)
    t = torch.randn(3, 7, 6, 8, generator=gen) * 3
    mask = make_mask(mask_kind, 3, 6, 8, gen)
    s = t.clone().requires_grad_(True)
    out = call_loss(L, name, s, t, mask, T)
    assert abs(float(out.detach())) <= 1e-6
    out.backward()
    assert bool(torch.isfinite(s.grad).all())


@pytest.mark.parametrize("which", ["student", "teacher"])
@pytest.mark.parametrize("mask_kind", [None, "random"])
def test_icsd_invariant_to_per_class_constant(L, which, mask_kind):
    gen = torch.Generator().manual_seed(14)
    s = torch.randn(2, 5, 5, 6, generator=gen) * 3
    t = torch.randn(2, 5, 8, 9, generator=gen) * 3  # mismatched: bilinear keeps constants constant
    mask = make_mask(mask_kind, 2, 8, 9, gen)
    ref = call_loss(L, "icsd", s, t, mask, 2.0)
    x = s if which == "student" else t
    x2 = x.clone()
    x2[:, 1] += 7.25
    x2[:, 3] -= 4.5
    args = (x2, t) if which == "student" else (s, x2)
    got = call_loss(L, "icsd", *args, mask, 2.0)
    assert_close_scalar(got, float(ref), rtol=1e-4, atol=1e-7, msg="ICSD with shifted class logits")


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_invariant_to_class_permutation(L, name):
    gen = torch.Generator().manual_seed(15)
    s = torch.randn(3, 6, 5, 7, generator=gen) * 3
    t = torch.randn(3, 6, 6, 8, generator=gen) * 3
    mask = make_mask("empty_image", 3, 6, 8, gen)
    perm = torch.randperm(6, generator=gen)
    ref = call_loss(L, name, s, t, mask, 2.0)
    got = call_loss(L, name, s[:, perm], t[:, perm], mask, 2.0)
    assert_close_scalar(got, float(ref), rtol=1e-5, atol=1e-7, msg=f"{name} with permuted classes")


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_masked_out_pixels_are_ignored(L, name):
    gen = torch.Generator().manual_seed(16)
    s = torch.randn(3, 5, 6, 7, generator=gen) * 3
    t = torch.randn(3, 5, 6, 7, generator=gen) * 3
    mask = make_mask("empty_image", 3, 6, 7, gen)
    ref = call_loss(L, name, s, t, mask, 2.0)
    inv = ~mask[:, None].expand_as(s)
    s2 = torch.where(inv, torch.randn(s.shape, generator=gen) * 10, s)
    t2 = torch.where(inv, torch.randn(t.shape, generator=gen) * 10, t)
    got = call_loss(L, name, s2, t2, mask, 2.0)
    assert_close_scalar(got, float(ref), rtol=1e-5, atol=1e-7, msg=f"{name} after editing masked-out pixels")
    # ... while the same edit without the mask does change the value (the test has teeth)
    assert abs(float(call_loss(L, name, s2, t2, None, 2.0)) - float(call_loss(L, name, s, t, None, 2.0))) > 1e-4


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_empty_image_gets_zero_gradient_and_does_not_dilute(L, name):
    """An image without valid pixels contributes nothing: zero gradient, and the value equals the loss
    of the batch without that image (the mean runs over counted images only)."""
    case = (3, 5, 5, 6, 7, 8, "empty_image", 2.0, 30)  # image 1 has no valid pixel
    s, t, mask, T = make_case(case)
    x = s.clone().requires_grad_(True)
    out = call_loss(L, name, x, t, mask, T)
    out.backward()
    assert float(x.grad[1].abs().max()) == 0.0
    assert float(x.grad[0].abs().max()) > 0.0
    keep = torch.tensor([0, 2])
    sub = call_loss(L, name, s[keep], t[keep], mask[keep], T)
    assert_close_scalar(out.detach(), float(sub), rtol=1e-5, atol=1e-7, msg=f"{name} empty image dilutes the mean")


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_non_contiguous_inputs(L, name):
    case = (2, 5, 5, 6, 7, 8, "random", 2.0, 31)
    s, t, mask, T = make_case(case)
    ref = call_loss(L, name, s, t, mask, T)
    s_cl = s.contiguous(memory_format=torch.channels_last)
    t_nc = t.transpose(2, 3).contiguous().transpose(2, 3)  # same values, transposed strides
    m_nc = mask.transpose(1, 2).contiguous().transpose(1, 2)
    got = call_loss(L, name, s_cl, t_nc, m_nc, T)
    assert_close_scalar(got, float(ref), rtol=1e-5, atol=1e-7, msg=f"{name} non-contiguous inputs")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_result_is_float32_scalar_and_computed_in_float32(L, name, dtype):
    s, t = small_inputs(B=2, C=5, Hs=4, Ws=6, Ht=5, Wt=7, seed=17)
    s, t = s.to(dtype), t.to(dtype)
    mask = make_mask("random", 2, 5, 7, torch.Generator().manual_seed(18))
    out = call_loss(L, name, s, t, mask, 2.0)
    assert out.dtype == torch.float32 and out.dim() == 0 and bool(torch.isfinite(out))
    # low-precision inputs are upcast: same value as float32 arithmetic on the rounded inputs
    ref = call_loss(L, name, s.float(), t.float(), mask, 2.0)
    assert_close_scalar(out, float(ref), rtol=1e-4, atol=1e-6, msg=f"{name} {dtype}")


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_bf16_under_autocast_close_to_float32(L, name):
    s, t = small_inputs(B=2, C=6, Hs=5, Ws=6, Ht=7, Wt=8, seed=19)
    mask = make_mask("random", 2, 7, 8, torch.Generator().manual_seed(20))
    ref = float(call_loss(L, name, s, t, mask, 2.0))
    sb = s.bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = call_loss(L, name, sb, t.bfloat16(), mask, 2.0)
    assert out.dtype == torch.float32 and bool(torch.isfinite(out))
    val = float(out.detach())
    assert abs(val - ref) <= 5e-2 * abs(ref) + 1e-6, f"{name}: bf16/autocast {val} vs fp32 {ref}"
    out.backward()
    assert bool(torch.isfinite(sb.grad.float()).all())


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_float32_inputs_under_autocast_keep_float32_accuracy(L, name):
    """Spec: all arithmetic in float32 even under autocast (no bf16 matmuls inside)."""
    case = (2, 19, 5, 6, 7, 8, "random", 2.0, 21)
    s, t, mask, T = make_case(case)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = call_loss(L, name, s, t, mask, T)
    assert out.dtype == torch.float32
    assert_close_scalar(out, BRUTE[name](s, t, mask, T), rtol=1e-4, atol=1e-7, msg=f"{name} under autocast")


@pytest.mark.parametrize("T", [1.0, 4.0])
@pytest.mark.parametrize("mode", ["sign", "uniform"])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_finite_for_huge_logits(L, name, mode, T):
    gen = torch.Generator().manual_seed(22)
    if mode == "sign":
        s = torch.randn(2, 5, 4, 5, generator=gen).sign() * 1e4
        t = torch.randn(2, 5, 6, 7, generator=gen).sign() * 1e4
    else:
        s = (torch.rand(2, 5, 4, 5, generator=gen) * 2 - 1) * 1e4
        t = (torch.rand(2, 5, 6, 7, generator=gen) * 2 - 1) * 1e4
    mask = make_mask("random", 2, 6, 7, gen)
    for m in (None, mask):
        x = s.clone().requires_grad_(True)
        out = call_loss(L, name, x, t, m, T)
        assert bool(torch.isfinite(out)), f"{name}: {out}"
        out.backward()
        assert bool(torch.isfinite(x.grad).all()), f"{name}: non-finite grad"


@pytest.mark.parametrize("same_res", [True, False])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_single_valid_pixel(L, name, same_res):
    gen = torch.Generator().manual_seed(23)
    s = torch.randn(2, 5, 6, 7, generator=gen) * 3
    t = torch.randn(2, 5, 6, 7, generator=gen) * 3
    if same_res:
        mask = make_mask("single", 2, 6, 7, gen)
    else:
        s = F.interpolate(s, size=(4, 5), mode="bilinear", align_corners=False)
        mask = make_mask("single", 2, 6, 7, gen)
    x = s.clone().requires_grad_(True)
    out = call_loss(L, name, x, t, mask, 2.0)
    assert bool(torch.isfinite(out))
    out.backward()
    assert bool(torch.isfinite(x.grad).all())
    assert_close_scalar(out, BRUTE[name](s, t, mask, 2.0), msg=f"{name} single valid pixel")
    if name in ("icsd", "cwd"):  # one pixel: every spatial distribution is a point mass
        assert abs(float(out.detach())) <= 1e-7


@pytest.mark.parametrize("mask_res", ["teacher", "other"])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_all_invalid_batch_gives_exact_zero(L, name, mask_res):
    s, t = small_inputs(B=2, C=5, Hs=4, Ws=5, Ht=6, Wt=7, seed=24)
    mask = torch.zeros(2, 6, 7, dtype=torch.bool) if mask_res == "teacher" else torch.zeros(2, 11, 9, dtype=torch.bool)
    x = s.clone().requires_grad_(True)
    out = call_loss(L, name, x, t, mask, 2.0)
    assert out.dtype == torch.float32 and out.dim() == 0
    assert float(out.detach()) == 0.0
    out.backward()
    assert x.grad is not None, "backward must reach the student (zero gradients)"
    assert bool(torch.isfinite(x.grad).all()) and float(x.grad.abs().max()) == 0.0


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_module_wrappers_match_functions(L, name):
    cls = getattr(L, MODULE_NAMES[name])
    case = (3, 5, 5, 6, 7, 8, "empty_image", 2.0, 25)
    s, t, mask, T = make_case(case)
    mod = cls(temperature=T) if name in TEMPERATURE_LOSSES else cls()
    assert isinstance(mod, torch.nn.Module)
    for m in (None, mask):
        fn_val = call_loss(L, name, s, t, m, T)
        torch.testing.assert_close(mod(s, t, m), fn_val, rtol=1e-6, atol=0.0)
        torch.testing.assert_close(mod(s, t, valid_mask=m), fn_val, rtol=1e-6, atol=0.0)
    if name in TEMPERATURE_LOSSES:  # default temperature is 1
        torch.testing.assert_close(cls()(s, t), call_loss(L, name, s, t, None, 1.0), rtol=1e-6, atol=0.0)


def test_temperature_defaults_to_one(L):
    s, t = small_inputs(seed=26)
    for name in TEMPERATURE_LOSSES:
        fn = getattr(L, f"{name}_loss")
        torch.testing.assert_close(fn(s, t), fn(s, t, valid_mask=None, temperature=1.0), rtol=0.0, atol=0.0)


# --------------------------------------------------------------------------------------
# Dependencies
# --------------------------------------------------------------------------------------

ALLOWED_IMPORTS = {"torch", "__future__", "typing", "math"}


def test_losses_imports_only_torch():
    path = REPO_ROOT / "losses.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bad += [a.name for a in node.names if a.name.split(".")[0] not in ALLOWED_IMPORTS]
        elif isinstance(node, ast.ImportFrom):
            if node.level or (node.module or "").split(".")[0] not in ALLOWED_IMPORTS:
                bad.append("." * node.level + (node.module or ""))
    assert not bad, f"losses.py imports non-torch modules: {bad}"


def test_importing_losses_pulls_no_heavy_dependencies():
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(REPO_ROOT)!r})\n"
        "import torch\n"
        "before = set(sys.modules)\n"
        "import losses\n"
        "new = sorted({m.split('.')[0] for m in set(sys.modules) - before})\n"
        "heavy = sorted(m for m in ('transformers', 'datasets', 'accelerate', 'pandas', 'huggingface_hub') "
        "if m in sys.modules)\n"
        "extra = [m for m in new if m not in sys.stdlib_module_names and m not in ('torch', 'losses')]\n"
        "print(repr((heavy, extra)))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    heavy, extra = ast.literal_eval(res.stdout.strip().splitlines()[-1])
    assert heavy == [], f"importing losses loaded {heavy}"
    assert extra == [], f"importing losses loaded non-stdlib, non-torch modules {extra}"


# --------------------------------------------------------------------------------------
# Masked cross-entropy
# --------------------------------------------------------------------------------------
def brute_cross_entropy(logits, labels, ignore_index):
    """Mean over valid pixels of -log softmax(logits at the label's size)[label], Python floats."""
    up = F.interpolate(logits.double(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for i in range(labels.shape[1]):
            for j in range(labels.shape[2]):
                y = int(labels[b, i, j])
                if y == ignore_index:
                    continue
                row = [float(v) for v in up[b, :, i, j]]
                top = max(row)
                total += top + math.log(sum(math.exp(v - top) for v in row)) - row[y]
                count += 1
    return total / max(count, 1)


@pytest.mark.parametrize("size", [(4, 5), (8, 10)])
def test_masked_cross_entropy_matches_brute_force(L, size):
    g = torch.Generator().manual_seed(3)
    logits = 3 * torch.randn(2, 5, *size, generator=g)
    labels = torch.randint(0, 5, (2, 8, 10), generator=g)
    labels[0, :3] = 255
    got = L.masked_cross_entropy(logits, labels, ignore_index=255)
    assert got.dtype == torch.float32
    assert_close_scalar(got, brute_cross_entropy(logits, labels, 255), msg="masked CE")


def test_masked_cross_entropy_all_ignore_is_zero_with_zero_gradient(L):
    logits = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    labels = torch.full((2, 6, 6), 7)
    loss = L.masked_cross_entropy(logits, labels, ignore_index=7)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(logits.grad) == 0


def test_masked_cross_entropy_gradcheck(L):
    logits = torch.randn(1, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[[0, 1, 2, 255, 1, 0], [2, 2, 255, 0, 1, 1], [0, 0, 1, 2, 255, 255]]])
    assert torch.autograd.gradcheck(lambda x: L.masked_cross_entropy(x, labels, 255), (logits,))
