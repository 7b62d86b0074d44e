"""Tests of dvfl.losses: the KD loss is a real, T^2-scaled, fp32, batch-mean KL plus a CE that
unlabelled clips can never reach."""

import pytest
import torch
import torch.nn.functional as F

from dvfl.losses import DistillationLoss, distillation_loss, kl_per_clip


def _logits(b=6, c=11, scale=3.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, c, generator=g, dtype=dtype) * scale,
            torch.randn(b, c, generator=g, dtype=dtype) * scale)


def _hand_kl(s, t, T):
    """Explicit sum_c p_t * (log p_t - log p_s) per row, float64, no log_softmax/kl_div."""
    s, t = s.double() / T, t.double() / T
    p_t = torch.exp(t - t.max(-1, keepdim=True).values)
    p_t = p_t / p_t.sum(-1, keepdim=True)
    p_s = torch.exp(s - s.max(-1, keepdim=True).values)
    p_s = p_s / p_s.sum(-1, keepdim=True)
    return (p_t * (torch.log(p_t) - torch.log(p_s))).sum(-1)


@pytest.mark.parametrize("T", [1.0, 2.5, 7.0])
def test_equals_hand_computed_kl(T):
    s, t = _logits()
    out = distillation_loss(s, t, targets=None, alpha=1.0, temperature=T)
    hand = _hand_kl(s, t, T)
    torch.testing.assert_close(kl_per_clip(s, t, T), hand, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.kd, T * T * hand.mean(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.total, out.kd)
    # float32 inputs: same value to fp32 precision, computed in fp32
    out32 = distillation_loss(s.float(), t.float(), alpha=1.0, temperature=T)
    assert out32.total.dtype == torch.float32
    torch.testing.assert_close(out32.kd.double(), T * T * hand.mean(), rtol=1e-5, atol=1e-6)


def test_zero_when_student_equals_teacher():
    s, _ = _logits()
    y = torch.randint(0, s.shape[1], (s.shape[0],))
    for T in (0.5, 1.0, 4.0):
        out = distillation_loss(s, s.clone(), y, alpha=1.0, temperature=T)
        assert abs(out.total.item()) < 1e-12 and abs(out.kd.item()) < 1e-12


def test_alpha_zero_is_plain_cross_entropy():
    s, t = _logits(dtype=torch.float32)
    y = torch.randint(0, s.shape[1], (s.shape[0],), generator=torch.Generator().manual_seed(1))
    out = distillation_loss(s, t, y, alpha=0.0, temperature=4.0)
    torch.testing.assert_close(out.total, F.cross_entropy(s, y))
    torch.testing.assert_close(out.ce, F.cross_entropy(s, y))
    ls = distillation_loss(s, t, y, alpha=0.0, temperature=4.0, label_smoothing=0.1)
    torch.testing.assert_close(ls.total, F.cross_entropy(s, y, label_smoothing=0.1))
    assert out.num_labelled.item() == s.shape[0]


def test_total_is_weighted_sum_of_parts():
    s, t = _logits()
    y = torch.randint(0, s.shape[1], (s.shape[0],))
    out = distillation_loss(s, t, y, alpha=0.3, temperature=2.0)
    torch.testing.assert_close(out.total, 0.3 * out.kd + 0.7 * out.ce)
    torch.testing.assert_close(out.ce, F.cross_entropy(s, y))


@pytest.mark.parametrize("kind", ["hard", "soft", "unlabelled"])
def test_gradient_matches_finite_differences(kind):
    s, t = _logits(b=4, c=5, scale=2.0, seed=3)
    s.requires_grad_(True)
    b, c = s.shape
    labelled = None
    if kind == "hard":
        y = torch.tensor([0, 3, 1, 4])
    elif kind == "soft":
        y = torch.softmax(torch.randn(b, c, dtype=torch.float64), -1)
    else:
        y = torch.tensor([2, -1, 0, 7])  # clip 3 masked out below; 7 is out of range
        labelled = torch.tensor([True, True, True, False])

    def f(x):
        o = distillation_loss(x, t, y, alpha=0.4, temperature=3.0, labelled=labelled,
                              unlabeled_weight=0.5, label_smoothing=0.05)
        return o.total, o.kd, o.ce

    assert torch.autograd.gradcheck(f, (s,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_temperature_squared_scaling():
    s, t = _logits(b=5, c=9, scale=1.0, seed=4)
    for T in (2.0, 5.0):
        out = distillation_loss(s, t, alpha=1.0, temperature=T)
        unscaled = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1),
                            log_target=True, reduction="batchmean")
        torch.testing.assert_close(out.kd, T ** 2 * unscaled, rtol=1e-12, atol=0.0)

    # Gradient magnitude: T^2 * KL has d/ds_j = T (q_j - p_j) / B -> (s_j - t_j - mean(s - t)) / (C B)
    # for large T, i.e. independent of T; the unscaled KL's gradient shrinks as 1/T^2.
    grads = {}
    for T in (50.0, 100.0):
        x = s.clone().requires_grad_(True)
        distillation_loss(x, t, alpha=1.0, temperature=T).total.backward()
        grads[T] = x.grad
    b, c = s.shape
    d = s - t
    limit = (d - d.mean(-1, keepdim=True)) / (c * b)
    torch.testing.assert_close(grads[100.0], limit, rtol=0.03, atol=1e-4)
    ratio = grads[50.0].norm() / grads[100.0].norm()
    assert abs(ratio.item() - 1.0) < 0.02  # the unscaled KL would give ~4
    x = s.clone().requires_grad_(True)
    out = distillation_loss(x, t, alpha=1.0, temperature=100.0)
    (out.kd / 100.0 ** 2).backward()
    torch.testing.assert_close(x.grad * 100.0 ** 2, grads[100.0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.float16])
def test_stable_for_confident_logits(teacher_dtype):
    g = torch.Generator().manual_seed(5)
    b, c = 8, 101
    s = (torch.randint(0, 2, (b, c), generator=g).float() * 2 - 1) * 1e4
    t = ((torch.randint(0, 2, (b, c), generator=g).float() * 2 - 1) * 1e4).to(teacher_dtype)
    t[:, 0] = 1e4  # teacher certain; student often certain of other classes
    s[:, 0] = -1e4
    y = torch.randint(0, c, (b,), generator=g)
    y[::2] = -1  # some unlabelled clips too
    for alpha in (0.0, 0.5, 1.0):
        x = s.clone().requires_grad_(True)
        out = distillation_loss(x, t, y, alpha=alpha, temperature=1.0)
        out.total.backward()
        for v in out[:3]:
            assert torch.isfinite(v).all(), out
        assert torch.isfinite(x.grad).all()
    assert out.kd.item() > 1e4  # confident and wrong: a large but finite KL


def test_masked_teacher_logits_rule_classes_out():
    # A teacher logit of -inf (a masked class) has p_t = 0: it adds nothing to the KL, whatever the
    # student says of that class, and the value and gradient stay finite (0 * -inf was NaN).
    s, t = _logits()
    masked = t.clone()
    masked[:, :3] = float("-inf")
    x = s.clone().requires_grad_(True)
    out = distillation_loss(x, masked, alpha=1.0, temperature=2.0)
    out.total.backward()
    assert torch.isfinite(out.kd) and torch.isfinite(x.grad).all()
    # The same as the KL over the classes the teacher keeps, with the student renormalised over all.
    log_p_s = torch.log_softmax(s / 2.0, dim=-1)[:, 3:]
    log_p_t = torch.log_softmax(t[:, 3:] / 2.0, dim=-1)
    hand = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    torch.testing.assert_close(out.kd, 4.0 * hand.mean(), rtol=1e-10, atol=1e-12)
    # +inf (a float16 cache's overflow) or NaN is a broken teacher, not a masked class: NaN, seen.
    for bad in (float("inf"), float("nan")):
        broken = t.clone()
        broken[0, 1] = bad
        assert torch.isnan(distillation_loss(s, broken, alpha=1.0).total)


def test_fp16_teacher_logits_are_cast_up():
    s, t = _logits(dtype=torch.float32)
    t16 = t.half()
    y = torch.randint(0, s.shape[1], (s.shape[0],))
    out = distillation_loss(s, t16, y, alpha=0.7, temperature=2.0)
    ref = distillation_loss(s, t16.float(), y, alpha=0.7, temperature=2.0)
    assert out.total.dtype == torch.float32
    torch.testing.assert_close(out.total, ref.total, rtol=0, atol=0)


def test_fp32_under_autocast():
    s, t = _logits(dtype=torch.float32)
    sb, tb = s.bfloat16(), t.half()
    y = torch.randint(0, s.shape[1], (s.shape[0],))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = distillation_loss(sb, tb, y, alpha=0.5, temperature=3.0)
    ref = distillation_loss(sb.float(), tb.float(), y, alpha=0.5, temperature=3.0)
    assert out.total.dtype == torch.float32
    torch.testing.assert_close(out.total, ref.total)


def test_teacher_gets_no_gradient():
    s, t = _logits()
    t.requires_grad_(True)
    s.requires_grad_(True)
    distillation_loss(s, t, alpha=1.0, temperature=2.0).total.backward()
    assert t.grad is None and s.grad is not None


def test_soft_targets_match_timm_soft_target_cross_entropy():
    from timm.loss import SoftTargetCrossEntropy

    s, t = _logits(dtype=torch.float32)
    b, c = s.shape
    y = torch.softmax(torch.randn(b, c), -1)
    out = distillation_loss(s, t, y, alpha=0.0, temperature=1.0)
    torch.testing.assert_close(out.ce, SoftTargetCrossEntropy()(s, y))
    # one-hot soft rows == hard labels
    hard = torch.randint(0, c, (b,))
    torch.testing.assert_close(
        distillation_loss(s, t, F.one_hot(hard, c).float(), alpha=0.2, temperature=2.0).total,
        distillation_loss(s, t, hard, alpha=0.2, temperature=2.0).total)


def test_unlabelled_hard_labels_never_reach_ce():
    s, t = _logits(b=6, c=7)
    # Unlabelled rows: the student is extremely sure of class 6; any label placed there by
    # mistake (-1 -> error, class 0 -> CE ~ 1e4) would change or break the CE.
    s[1] = torch.tensor([-1e4] * 6 + [1e4], dtype=s.dtype)
    s[4] = torch.tensor([-1e4] * 6 + [1e4], dtype=s.dtype)
    y = torch.tensor([3, -1, 0, 5, -1, 2])
    lab = y != -1
    x = s.clone().requires_grad_(True)
    out = distillation_loss(x, t, y, alpha=0.0, temperature=2.0)
    torch.testing.assert_close(out.ce, F.cross_entropy(s[lab], y[lab]))
    assert out.num_labelled.item() == 4
    out.total.backward()
    assert (x.grad[~lab] == 0).all()  # alpha = 0: unlabelled clips get no gradient at all
    with pytest.raises((IndexError, RuntimeError)):
        F.cross_entropy(s, y)  # what would happen if -1 reached the CE

    # A boolean mask works the same, whatever garbage the masked labels hold.
    y2 = y.clone()
    y2[~lab] = 10 ** 6
    out2 = distillation_loss(s, t, y2, alpha=0.0, temperature=2.0, labelled=lab)
    torch.testing.assert_close(out2.ce, out.ce)

    # A custom ignore_index.
    y3 = torch.where(lab, y, torch.full_like(y, -100))
    out3 = distillation_loss(s, t, y3, alpha=0.0, temperature=2.0, ignore_index=-100)
    torch.testing.assert_close(out3.ce, out.ce)


def test_unlabelled_soft_rows_never_reach_ce():
    from timm.loss import SoftTargetCrossEntropy

    s, t = _logits(b=5, c=4)
    y = torch.softmax(torch.randn(5, 4, dtype=torch.float64), -1)
    lab = torch.tensor([True, False, True, True, False])
    y[~lab] = float("nan")
    x = s.clone().requires_grad_(True)
    out = distillation_loss(x, t, y, alpha=0.25, temperature=2.0, labelled=lab)
    torch.testing.assert_close(out.ce, SoftTargetCrossEntropy()(s[lab], y[lab]))
    out.total.backward()
    assert torch.isfinite(out.total) and torch.isfinite(x.grad).all()


def test_kd_averages_over_all_clips_with_unlabeled_weight():
    s, t = _logits(b=6, c=7)
    y = torch.tensor([3, -1, 0, 5, -1, 2])
    lab = y != -1
    T = 3.0
    kl = _hand_kl(s, t, T)
    out = distillation_loss(s, t, y, alpha=0.6, temperature=T)
    torch.testing.assert_close(out.kd, T * T * kl.mean())  # all 6 clips, divided by B
    w = distillation_loss(s, t, y, alpha=0.6, temperature=T, unlabeled_weight=0.25)
    weights = torch.where(lab, 1.0, 0.25).double()
    torch.testing.assert_close(w.kd, T * T * (kl * weights).sum() / 6)
    torch.testing.assert_close(w.ce, out.ce)


def test_all_unlabelled_batch_is_pure_distillation():
    s, t = _logits()
    none = distillation_loss(s, t, None, alpha=0.4, temperature=2.0)
    minus = distillation_loss(s, t, torch.full((s.shape[0],), -1), alpha=0.4, temperature=2.0)
    for out in (none, minus):
        assert out.ce.item() == 0.0 and out.num_labelled.item() == 0
        torch.testing.assert_close(out.total, 0.4 * out.kd)


@pytest.mark.parametrize("kwargs, exc", [
    (dict(alpha=-0.1), ValueError), (dict(alpha=1.5), ValueError),
    (dict(alpha=float("nan")), ValueError), (dict(alpha="0.5"), TypeError),
    (dict(temperature=0.0), ValueError), (dict(temperature=-2.0), ValueError),
    (dict(temperature=float("inf")), ValueError), (dict(temperature=float("nan")), ValueError),
    (dict(unlabeled_weight=-1.0), ValueError), (dict(label_smoothing=1.0), ValueError),
])
def test_bad_arguments_raise(kwargs, exc):
    s, t = _logits()
    args = dict(alpha=0.5, temperature=2.0)
    args.update(kwargs)
    with pytest.raises(exc, match=next(iter(kwargs))):
        distillation_loss(s, t, None, **args)
    with pytest.raises(exc, match=next(iter(kwargs))):
        DistillationLoss(**args)


def test_bad_shapes_raise():
    s, t = _logits(b=4, c=5)
    with pytest.raises(ValueError):
        distillation_loss(s, t[:, :4], None)
    with pytest.raises(ValueError):
        distillation_loss(s, t, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError):
        distillation_loss(s, t, torch.zeros(4, 6))
    with pytest.raises(ValueError):
        distillation_loss(s, t, torch.zeros(4, dtype=torch.long), labelled=torch.ones(4))


def test_module_wrapper():
    s, t = _logits()
    y = torch.randint(0, s.shape[1], (s.shape[0],))
    crit = DistillationLoss(alpha=0.8, temperature=4.0, label_smoothing=0.1)
    out = crit(s, t, y)
    ref = distillation_loss(s, t, y, 0.8, 4.0, label_smoothing=0.1)
    torch.testing.assert_close(out.total, ref.total)
    assert "alpha=0.8" in repr(crit)


def test_official_repo_softmax_bug_is_not_reproduced():
    # The official code feeds softmax (not log_softmax) as kl_div's input: at student == teacher
    # that "loss" is not zero (F.kl_div(F.softmax(s/T), F.softmax(s/T)) != 0), whereas a real KL is;
    # and the loss must move with the student as the real KL does, not as that one.
    s, t = _logits()
    T = 4.0
    assert abs(distillation_loss(s, s, alpha=1.0, temperature=T).total.item()) < 1e-12
    real = F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T * T
    buggy = F.kl_div(F.softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T * T
    ours = distillation_loss(s, t, alpha=1.0, temperature=T).total
    assert abs(ours.item() - real.item()) < 1e-5 and abs(ours.item() - buggy.item()) > 1e-3


def test_a_labelled_target_outside_the_classes_is_an_error_even_minus_100():
    """Targets other than ignore_index are labelled; PyTorch's cross_entropy silently gave -100
    (its own default ignore_index) a loss of 0 while it was counted among the labelled clips."""
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    for bad in (-100, -5, 5):
        with pytest.raises(IndexError, match="out of bounds"):
            distillation_loss(s, t, torch.tensor([1, 2, bad, 3]), alpha=0.0)
    out = distillation_loss(s, t, torch.tensor([1, 2, -1, 3]), alpha=0.0)
    assert int(out.num_labelled) == 3
    torch.testing.assert_close(out.ce, torch.nn.functional.cross_entropy(s[[0, 1, 3]], torch.tensor([1, 2, 3])))
