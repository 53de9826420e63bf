"""Distillation losses for semantic segmentation: AICSD's ICSD, pixel-wise KD and two baselines.

This file imports only ``torch`` so it can be copied whole into another project.

Every loss takes raw logits

* ``student_logits`` ``(B, C, Hs, Ws)`` and ``teacher_logits`` ``(B, C, Ht, Wt)``;
* an optional ``valid_mask`` ``(B, H, W)`` bool, True where the label is not the ignore index, at any
  resolution;

and returns a float32 scalar (float64 when the inputs are float64, so ``gradcheck`` works).

Shared conventions, applied before any loss is computed:

* **Alignment.** When the spatial sizes differ the student logits are bilinearly resized to the teacher's
  size (``align_corners=False``) and the mask is resized to that size with nearest-neighbour sampling.
* **Precision.** Low-precision inputs (bf16/fp16) are upcast and autocast is switched off inside the losses:
  a softmax over 10^5 pixels or a C×C reduction over them loses all meaning in bf16.
* **Teacher.** The teacher logits are detached; no gradient ever reaches the teacher.
* **Masking.** Invalid pixels take no part in any sum or softmax. An image without any valid pixel
  contributes nothing; a batch without any valid pixel gives exactly 0 (with zero gradients), not NaN.

Reference: Mansourian, Ahmadi, Kasaei, "AICSD: Adaptive Inter-Class Similarity Distillation for Semantic
Segmentation", arXiv:2308.04243. The definitions here fix the authors' public code, which takes the
softmax over the height axis only, feeds probabilities where log-probabilities are due, symmetrises the
similarity matrix and loops over class pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "icsd_loss",
    "kd_loss",
    "cwd_loss",
    "ickd_loss",
    "masked_cross_entropy",
    "ics_matrix",
    "row_normalize",
    "ICSDLoss",
    "KDLoss",
    "CWDLoss",
    "ICKDLoss",
]

_NORM_EPS = 1e-12


# --------------------------------------------------------------------------------------------------------
# Input handling shared by every loss
# --------------------------------------------------------------------------------------------------------
def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    # float64 stays float64 (gradcheck, brute-force comparisons); everything else is computed in float32.
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_logits(student: Tensor, teacher: Tensor) -> None:
    if student.dim() != 4 or teacher.dim() != 4:
        raise ValueError(
            f"logits must be (B, C, H, W); got student {tuple(student.shape)} and teacher {tuple(teacher.shape)}"
        )
    if student.shape[:2] != teacher.shape[:2]:
        raise ValueError(
            f"student and teacher logits must agree in batch size and class count; got student "
            f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}"
        )
    if not (student.is_floating_point() and teacher.is_floating_point()):
        raise ValueError(f"logits must be floating point; got {student.dtype} and {teacher.dtype}")


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")


def _flat_mask(valid_mask: Tensor | None, batch: int, size: tuple[int, int]) -> Tensor | None:
    """Bring a ``(B, H, W)`` bool mask to ``size`` with nearest sampling and flatten it to ``(B, N)``."""
    if valid_mask is None:
        return None
    if valid_mask.dtype != torch.bool:
        raise ValueError(
            f"valid_mask must be a bool tensor (True where the label is not the ignore index); got {valid_mask.dtype}"
        )
    if valid_mask.dim() != 3 or valid_mask.shape[0] != batch:
        raise ValueError(f"valid_mask must be (B={batch}, H, W); got {tuple(valid_mask.shape)}")
    if tuple(valid_mask.shape[-2:]) != tuple(size):
        valid_mask = F.interpolate(valid_mask[:, None].float(), size=size, mode="nearest")[:, 0] > 0.5
    return valid_mask.flatten(1)


def _align(
    student_logits: Tensor, teacher_logits: Tensor, valid_mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Upcast, detach the teacher, resize the student to the teacher's size; return ``(B, C, N)`` and ``(B, N)``."""
    _check_logits(student_logits, teacher_logits)
    dtype = _compute_dtype(student_logits, teacher_logits)
    s = student_logits.to(dtype)
    t = teacher_logits.detach().to(dtype)
    size = tuple(t.shape[-2:])
    if tuple(s.shape[-2:]) != size:
        s = F.interpolate(s, size=size, mode="bilinear", align_corners=False)
    mask = _flat_mask(valid_mask, s.shape[0], size)
    return s.flatten(2), t.flatten(2), mask


def _image_weights(mask: Tensor | None, batch: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image weight (1 if the image has a valid pixel, else 0) and the number of such images (>= 1)."""
    if mask is None:
        w = torch.ones(batch, dtype=like.dtype, device=like.device)
    else:
        w = mask.any(dim=1).to(like.dtype)
    return w, w.sum().clamp_min(1.0)


def _spatial_log_softmax(x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Softmax of each ``(b, c)`` row of ``x`` ``(B, C, N)`` over its valid pixels.

    Returns ``(p, log_p)``, both ``(B, C, N)``, with ``p = 0`` and ``log_p = 0`` at invalid pixels so that
    products such as ``p_i * log_p_j`` vanish there without producing ``0 * -inf``. An image with no valid
    pixel is treated as fully valid here (finite values); its weight of 0 removes it from the loss.
    """
    if mask is None:
        log_p = torch.log_softmax(x, dim=-1)
        return log_p.exp(), log_p
    keep = mask | ~mask.any(dim=1, keepdim=True)  # (B, N)
    keep = keep[:, None, :]
    log_p = torch.log_softmax(x.masked_fill(~keep, float("-inf")), dim=-1)
    log_p = log_p.masked_fill(~keep, 0.0)
    p = log_p.exp().masked_fill(~keep, 0.0)
    return p, log_p


def _pair_sums(a: Tensor, b: Tensor) -> Tensor:
    """``out[b, i, j] = sum_n a[b, i, n] * b[b, j, n]`` for ``(B, C, N)`` inputs, as batched matmuls.

    On CUDA a single matmul whose reduction runs over hundreds of thousands of pixels into a tiny C×C output
    leaves most of the chip idle; splitting the pixel axis into chunks that run as one larger batch and
    summing the partial products afterwards keeps it busy (split-K). On CPU the plain matmul is fastest.
    """
    batch, classes, n = a.shape
    if a.device.type != "cuda" or n < 32768:
        return torch.bmm(a, b.transpose(1, 2))
    chunk = 8192
    pad = (-n) % chunk
    if pad:
        a = F.pad(a, (0, pad))
        b = F.pad(b, (0, pad))
    k = (n + pad) // chunk
    a = a.view(batch, classes, k, chunk).transpose(1, 2).reshape(batch * k, classes, chunk)
    b = b.view(batch, classes, k, chunk).transpose(1, 2).reshape(batch * k, classes, chunk)
    return torch.bmm(a, b.transpose(1, 2)).view(batch, k, classes, classes).sum(dim=1)


def row_normalize(matrix: Tensor) -> Tensor:
    """L2-normalise the rows of ``(B, C, C)`` matrices: ``M[b, i, :] / max(||M[b, i, :]||_2, 1e-12)``."""
    return matrix / torch.linalg.vector_norm(matrix, dim=-1, keepdim=True).clamp_min(_NORM_EPS)


def _ics_from_flat(x: Tensor, mask: Tensor | None, temperature: float) -> Tensor:
    p, log_p = _spatial_log_softmax(x if temperature == 1 else x / temperature, mask)
    cross = _pair_sums(p, log_p)  # (B, C, C): sum_n P_i log P_j
    # The diagonal sum_n P_i log P_i is the negative entropy: KL(P_i || P_j) = cross[i, i] - cross[i, j],
    # one product over the pixels instead of an extra pass for the entropy.
    kl = cross.diagonal(dim1=1, dim2=2)[:, :, None] - cross
    # KL(P_i || P_i) is 0 by definition; the subtraction above leaves rounding noise on the diagonal.
    eye = torch.eye(kl.shape[-1], dtype=torch.bool, device=kl.device)
    return kl.masked_fill(eye, 0.0)


# --------------------------------------------------------------------------------------------------------
# Public losses
# --------------------------------------------------------------------------------------------------------
def ics_matrix(logits: Tensor, valid_mask: Tensor | None = None, temperature: float = 1.0) -> Tensor:
    """Inter-class similarity matrix of AICSD (before row normalisation).

    For each image ``b`` and class ``c``, ``P[b, c] = softmax_n(x[b, c, n] / T)`` over the valid pixels
    ``n`` (the intra-class distribution), and ``A[b, i, j] = KL(P[b, i] || P[b, j])
    = sum_n P[b, i, n] (log P[b, i, n] - log P[b, j, n])``: asymmetric, non-negative, zero diagonal.

    Args:
        logits: ``(B, C, H, W)``.
        valid_mask: optional ``(B, h, w)`` bool, resized to ``(H, W)`` with nearest sampling.
        temperature: ``T > 0``.

    Returns:
        ``(B, C, C)`` in float32 (float64 for float64 input). Rows of images without valid pixels are
        meaningless (computed as if every pixel were valid).
    """
    _check_temperature(temperature)
    if logits.dim() != 4:
        raise ValueError(f"logits must be (B, C, H, W); got {tuple(logits.shape)}")
    with torch.autocast(device_type=logits.device.type, enabled=False):
        x = logits.to(_compute_dtype(logits)).flatten(2)
        mask = _flat_mask(valid_mask, logits.shape[0], tuple(logits.shape[-2:]))
        return _ics_from_flat(x, mask, temperature)


def icsd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    valid_mask: Tensor | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """Inter-Class Similarity Distillation loss (AICSD, arXiv:2308.04243).

    ``Â = row_normalize(ics_matrix(x))`` for student and teacher (see :func:`ics_matrix`), and

        icsd = mean over images b with a valid pixel, and all i, j, of (Â_s[b, i, j] - Â_t[b, i, j])^2

    Cost: two ``(B, C, N) x (B, N, C)`` matrix products; memory ``O(B·C·N)`` (no ``(B, C, C, N)`` tensor).

    Args:
        student_logits: ``(B, C, Hs, Ws)``; resized bilinearly to the teacher's size when it differs.
        teacher_logits: ``(B, C, Ht, Wt)``; detached.
        valid_mask: optional ``(B, H, W)`` bool, True where the label is valid; any resolution.
        temperature: softmax temperature ``T > 0``.

    Returns:
        Scalar, float32 (float64 for float64 inputs).
    """
    _check_temperature(temperature)
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        s, t, mask = _align(student_logits, teacher_logits, valid_mask)
        a_s = row_normalize(_ics_from_flat(s, mask, temperature))
        a_t = row_normalize(_ics_from_flat(t, mask, temperature))
        weight, count = _image_weights(mask, s.shape[0], s)
        per_image = (a_s - a_t).pow(2).mean(dim=(1, 2))
        return (per_image * weight).sum() / count


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    valid_mask: Tensor | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """Pixel-wise knowledge distillation (Hinton et al. 2015, applied per pixel).

        kd = T^2 * mean over valid pixels (all images pooled) of KL(softmax_c(t / T) || softmax_c(s / T))

    Args:
        student_logits: ``(B, C, Hs, Ws)``; resized bilinearly to the teacher's size when it differs.
        teacher_logits: ``(B, C, Ht, Wt)``; detached.
        valid_mask: optional ``(B, H, W)`` bool; any resolution.
        temperature: ``T > 0``.

    Returns:
        Scalar, float32 (float64 for float64 inputs); 0 when no pixel is valid.
    """
    _check_temperature(temperature)
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        s, t, mask = _align(student_logits, teacher_logits, valid_mask)
        log_q_s = torch.log_softmax(s / temperature, dim=1)
        log_q_t = torch.log_softmax(t / temperature, dim=1)
        per_pixel = (log_q_t.exp() * (log_q_t - log_q_s)).sum(dim=1)  # (B, N)
        if mask is None:
            total, count = per_pixel.sum(), per_pixel.new_tensor(float(per_pixel.numel()))
        else:
            total = torch.where(mask, per_pixel, torch.zeros_like(per_pixel)).sum()
            count = mask.sum().to(per_pixel.dtype).clamp_min(1.0)
        return temperature**2 * total / count


def cwd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    valid_mask: Tensor | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """Channel-wise distillation (Shu et al., "Channel-wise Knowledge Distillation for Dense Prediction",
    ICCV 2021).

    Each channel is turned into a distribution over the valid pixels, ``q[b, c] = softmax_n(x[b, c, n] / T)``:

        cwd = T^2 * mean over images b with a valid pixel, and classes c, of sum_n q_t log(q_t / q_s)

    Args:
        student_logits: ``(B, C, Hs, Ws)``; resized bilinearly to the teacher's size when it differs.
        teacher_logits: ``(B, C, Ht, Wt)``; detached.
        valid_mask: optional ``(B, H, W)`` bool; any resolution.
        temperature: ``T > 0``.

    Returns:
        Scalar, float32 (float64 for float64 inputs).
    """
    _check_temperature(temperature)
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        s, t, mask = _align(student_logits, teacher_logits, valid_mask)
        _, log_q_s = _spatial_log_softmax(s / temperature, mask)
        q_t, log_q_t = _spatial_log_softmax(t / temperature, mask)
        per_channel = (q_t * (log_q_t - log_q_s)).sum(dim=-1)  # (B, C)
        weight, count = _image_weights(mask, s.shape[0], s)
        return temperature**2 * (per_channel.mean(dim=1) * weight).sum() / count


def ickd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    valid_mask: Tensor | None = None,
) -> Tensor:
    """Inter-channel correlation distillation on the logits (after Liu et al., ICKD, ICCV 2021).

    Per image the Gram matrix of the flattened logits over the valid pixels,
    ``G[b, i, j] = sum_n x[b, i, n] x[b, j, n]``, is row-normalised, and

        ickd = mean over images b with a valid pixel, and all i, j, of (Ĝ_s[b, i, j] - Ĝ_t[b, i, j])^2

    Args:
        student_logits: ``(B, C, Hs, Ws)``; resized bilinearly to the teacher's size when it differs.
        teacher_logits: ``(B, C, Ht, Wt)``; detached.
        valid_mask: optional ``(B, H, W)`` bool; any resolution.

    Returns:
        Scalar, float32 (float64 for float64 inputs).
    """
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        s, t, mask = _align(student_logits, teacher_logits, valid_mask)
        if mask is not None:
            s = s * mask[:, None, :].to(s.dtype)
            t = t * mask[:, None, :].to(t.dtype)
        g_s = row_normalize(_pair_sums(s, s))
        g_t = row_normalize(_pair_sums(t, t))
        weight, count = _image_weights(mask, s.shape[0], s)
        per_image = (g_s - g_t).pow(2).mean(dim=(1, 2))
        return (per_image * weight).sum() / count


def masked_cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = 255) -> Tensor:
    """Cross-entropy of ``logits`` against ``labels``, averaged over the pixels whose label is not ignored.

    Args:
        logits: ``(B, C, h, w)``; resized bilinearly (``align_corners=False``) to the labels' size.
        labels: ``(B, H, W)`` integer class indices, ``ignore_index`` where there is no label.
        ignore_index: the label value that takes no part in the loss.

    Returns:
        Scalar, float32 (float64 for float64 logits). A batch without any valid pixel gives exactly 0 with
        zero gradients, where ``F.cross_entropy(reduction="mean")`` (and transformers' own segmentation loss)
        divides by zero and gives NaN.
    """
    with torch.autocast(device_type=logits.device.type, enabled=False):
        x = logits.to(_compute_dtype(logits))
        if x.shape[-2:] != labels.shape[-2:]:
            x = F.interpolate(x, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        total = F.cross_entropy(x, labels.long(), ignore_index=ignore_index, reduction="sum")
        return total / (labels != ignore_index).sum().clamp_min(1)


# --------------------------------------------------------------------------------------------------------
# nn.Module wrappers, for code that wants losses as modules
# --------------------------------------------------------------------------------------------------------
class _TemperatureLoss(nn.Module):
    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        _check_temperature(temperature)
        self.temperature = temperature

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class ICSDLoss(_TemperatureLoss):
    """Module form of :func:`icsd_loss`."""

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, valid_mask: Tensor | None = None) -> Tensor:
        return icsd_loss(student_logits, teacher_logits, valid_mask, self.temperature)


class KDLoss(_TemperatureLoss):
    """Module form of :func:`kd_loss`."""

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, valid_mask: Tensor | None = None) -> Tensor:
        return kd_loss(student_logits, teacher_logits, valid_mask, self.temperature)


class CWDLoss(_TemperatureLoss):
    """Module form of :func:`cwd_loss`."""

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, valid_mask: Tensor | None = None) -> Tensor:
        return cwd_loss(student_logits, teacher_logits, valid_mask, self.temperature)


class ICKDLoss(nn.Module):
    """Module form of :func:`ickd_loss`."""

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, valid_mask: Tensor | None = None) -> Tensor:
        return ickd_loss(student_logits, teacher_logits, valid_mask)
