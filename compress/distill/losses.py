"""Knowledge-distillation losses: pure tensor functions, no modules, no state.

* :func:`soft_kl` - Hinton, Vinyals & Dean, "Distilling the Knowledge in a
  Neural Network" (2015): KL between temperature-softened teacher and student
  distributions, scaled by ``T**2`` so its gradients keep their size as ``T``
  changes.
* :func:`hidden_mse` - TinyBERT (Jiao et al., 2020) hidden-state loss: MSE
  between a student layer's hidden states and its mapped teacher layer's
  (project the student first when widths differ).
* :func:`attention_kl` - MiniLM (Wang et al., 2020) / TinyBERT attention
  transfer: KL between teacher and student self-attention distributions.
* :func:`embedding_loss` - cosine or MSE between pooled sentence embeddings
  (task-agnostic distillation of sentence encoders, as in Sentence-BERT's
  multilingual distillation, Reimers & Gurevych 2020).

Every loss is computed in fp32 (so bf16/fp16 training does not lose the small
KL terms), returns a scalar, and is exactly zero when student equals teacher.
Masks are 1 for real tokens and 0 for padding.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

_EPS = 1e-12


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``values`` (B,) or (B, T) over all entries, or over entries where ``mask == 1``."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def soft_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float,
            mask: Tensor | None = None) -> Tensor:
    """Hinton KD loss ``T**2 * KL(softmax(t / T) || softmax(s / T))``.

    Args:
        student_logits: (B, C) per-example logits, or (B, T, V) per-position logits.
        teacher_logits: same shape as ``student_logits``.
        temperature: ``T > 0``; larger values soften both distributions.
        mask: optional (B, T) with 1 at positions that count (only for 3-D logits).

    Returns:
        Scalar fp32 loss: the KL summed over classes, averaged over examples
        (2-D logits) or over positions where ``mask == 1`` (3-D logits).
    """
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True).sum(-1)  # (B,) or (B, T)
    return _masked_mean(kl, mask) * temperature**2


def embedding_loss(student_z: Tensor, teacher_z: Tensor, kind: Literal["cosine", "mse"] = "cosine") -> Tensor:
    """Distance between pooled sentence embeddings.

    Args:
        student_z: (B, H) student embeddings (project first when widths differ).
        teacher_z: (B, H) teacher embeddings.
        kind: ``"cosine"`` gives mean ``1 - cos(s, t)`` (scale-free);
            ``"mse"`` gives the mean squared error over all elements.

    Returns:
        Scalar fp32 loss, zero when the embeddings are equal.
    """
    student_z, teacher_z = student_z.float(), teacher_z.float()
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(student_z, teacher_z, dim=-1)).mean()
    if kind == "mse":
        return F.mse_loss(student_z, teacher_z)
    raise ValueError(f"embedding loss kind must be 'cosine' or 'mse', got {kind!r}")


def hidden_mse(student_h: Tensor, teacher_h: Tensor, mask: Tensor | None = None) -> Tensor:
    """TinyBERT hidden-state loss: mean squared error per position, averaged over real tokens.

    Args:
        student_h: (B, T, H) student hidden states, already projected to the teacher width.
        teacher_h: (B, T, H) teacher hidden states of the mapped layer.
        mask: optional (B, T) attention mask; padding positions do not count.

    Returns:
        Scalar fp32 loss: mean over H of the squared difference, averaged over positions.
    """
    per_position = (student_h.float() - teacher_h.float()).pow(2).mean(-1)  # (B, T)
    return _masked_mean(per_position, mask)


def attention_kl(student_att: Tensor, teacher_att: Tensor, mask: Tensor | None = None) -> Tensor:
    """MiniLM/TinyBERT attention transfer: ``KL(teacher row || student row)`` of attention probabilities.

    When head counts differ, both sides are first averaged over heads (the
    mean of distributions is a distribution), so a student with fewer heads
    matches the teacher's head-averaged attention; with equal head counts
    each student head matches its teacher head.

    Args:
        student_att: (B, heads_s, T, T) attention probabilities (rows sum to 1).
        teacher_att: (B, heads_t, T, T) attention probabilities.
        mask: optional (B, T); query rows at padding positions do not count
            (padded keys carry ~0 probability in both, so they add nothing).

    Returns:
        Scalar fp32 loss: KL summed over keys, averaged over heads and query positions.
    """
    student_att, teacher_att = student_att.float(), teacher_att.float()
    if student_att.shape[1] != teacher_att.shape[1]:
        student_att = student_att.mean(1, keepdim=True)  # (B, 1, T, T)
        teacher_att = teacher_att.mean(1, keepdim=True)
    log_ratio = teacher_att.clamp_min(_EPS).log() - student_att.clamp_min(_EPS).log()
    kl = (teacher_att * log_ratio).sum(-1)  # (B, heads, T); a zero teacher probability adds nothing
    kl = kl.mean(1)  # (B, T)
    return _masked_mean(kl, mask)
