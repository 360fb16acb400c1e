"""The fusion core on hand-made tensors: Eq. 3, 4, 7, 8, 9 and the ablations' fusions."""

import torch

from rkif.kif import fusion
from rkif.kif.importance import EMAImportance, MeanImportance, SensitivityUncertainty, outer_ema, step_scores
from rkif.kif.masks import binary_masks, kth_largest, linear_quantile, top_fraction_threshold


def test_step_scores_weight_times_grad_and_grad_only():
    p = torch.nn.Parameter(torch.tensor([2.0, -3.0, 0.5]))
    p.grad = torch.tensor([0.5, 1.0, -4.0])
    assert torch.equal(step_scores({"p": p})["p"], torch.tensor([1.0, 3.0, 2.0]))          # |w g|, Eq. 3
    assert torch.equal(step_scores({"p": p}, "grad")["p"], torch.tensor([0.5, 1.0, 4.0]))  # |g|
    q = torch.nn.Parameter(torch.ones(2))
    assert torch.equal(step_scores({"q": q})["q"], torch.zeros(2))                          # no grad: zero


def test_inner_ema_matches_eq4():
    ema = EMAImportance(0.55)
    s1, s2 = {"p": torch.tensor([1.0, 2.0])}, {"p": torch.tensor([3.0, 0.0])}
    ema.update(s1)
    assert torch.allclose(ema.value["p"], 0.45 * torch.tensor([1.0, 2.0]))                  # from zero
    ema.update(s2)
    expected = 0.55 * 0.45 * torch.tensor([1.0, 2.0]) + 0.45 * torch.tensor([3.0, 0.0])
    assert torch.allclose(ema.value["p"], expected)
    ema.reset()
    assert ema.value is None
    last = EMAImportance(0.0)                                                                # "no EMA"
    last.update(s1)
    last.update(s2)
    assert torch.equal(last.value["p"], s2["p"])


def test_outer_ema_weights_the_new_value_eq7():
    prev, new = {"p": torch.tensor([4.0])}, {"p": torch.tensor([2.0])}
    assert torch.allclose(outer_ema(prev, new, 0.55)["p"], torch.tensor([0.55 * 2.0 + 0.45 * 4.0]))
    assert torch.equal(outer_ema(None, new, 0.55)["p"], new["p"])


def test_mean_importance_averages_outer_steps():
    m = MeanImportance()
    for v in (1.0, 2.0, 6.0):
        m.update({"p": torch.tensor([v])})
    assert torch.allclose(m.value["p"], torch.tensor([3.0]))


def test_sensitivity_uncertainty_release_formula():
    su = SensitivityUncertainty(0.85)
    su.update({"p": torch.tensor([1.0])})
    s1 = 0.15 * 1.0
    u1 = 0.15 * abs(1.0 - s1)
    su.update({"p": torch.tensor([3.0])})
    s2 = 0.85 * s1 + 0.15 * 3.0
    u2 = 0.85 * u1 + 0.15 * abs(3.0 - s2)
    assert torch.allclose(su.value["p"], torch.tensor([s2 * u2]))


def test_threshold_exact_on_ties_and_across_tensors():
    a = torch.tensor([5.0, 1.0, 3.0, 3.0])
    b = torch.tensor([[3.0, 0.0], [2.0, 7.0]])
    # all values sorted descending: 7 5 3 3 3 2 1 0
    assert kth_largest([a, b], 1) == 7.0
    assert kth_largest([a, b], 3) == 3.0 and kth_largest([a, b], 5) == 3.0
    assert kth_largest([a, b], 6) == 2.0
    assert top_fraction_threshold([a, b], 0.25) == 5.0                  # k = 2
    masks = binary_masks({"a": a, "b": b}, 0.3)                           # k = round(2.4) = 2 -> delta 5
    assert masks["a"].tolist() == [True, False, False, False] and masks["b"].sum() == 1
    masks = binary_masks({"a": a, "b": b}, 0.375)                         # k = 3 -> delta 3: ties all in (>=)
    assert int(masks["a"].sum() + masks["b"].sum()) == 5


def test_threshold_handles_negative_values_and_matches_sort():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-50, 50, (1000,), generator=g).float() / 4         # many ties, negatives
    ref = x.sort(descending=True).values
    for k in (1, 7, 200, 999, 1000):
        assert kth_largest([x[:300], x[300:]], k) == ref[k - 1].item()


def test_linear_quantile_matches_torch_quantile():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1001, generator=g)
    for q in (0.0, 0.5, 0.8, 1.0):
        assert abs(linear_quantile([x[:500], x[500:]], q) - torch.quantile(x, q).item()) < 1e-6
    m = binary_masks({"x": x}, 0.2, rule="quantile")
    assert torch.equal(m["x"], x > torch.quantile(x, 0.8))               # release: strict >


def test_threshold_exact_above_torch_quantile_limit():
    n = 2**24 + 1000                                                      # torch.quantile refuses this
    x = torch.rand(n, generator=torch.Generator().manual_seed(2))
    x[:5000] = 0.5                                                        # a block of ties
    k = round(0.2 * n)
    expected = torch.kthvalue(x, n - k + 1).values.item()                # k-th largest
    parts = [x[: n // 3], x[n // 3:]]
    assert top_fraction_threshold(parts, 0.2) == expected
    masks = binary_masks({"a": parts[0], "b": parts[1]}, 0.2)
    assert int(masks["a"].sum() + masks["b"].sum()) == int((x >= expected).sum())


def test_per_tensor_scope_thresholds_each_tensor():
    scores = {"a": torch.arange(10.0), "b": torch.arange(10.0) * 100}
    glob = binary_masks(scores, 0.2)
    per = binary_masks(scores, 0.2, scope="per_tensor")
    assert glob["a"].sum() == 0 and glob["b"].sum() == 4
    assert per["a"].sum() == 2 and per["b"].sum() == 2


def _vectors():
    anchor = {"p": torch.tensor([1.0, 1.0, 1.0, 1.0])}
    tau_in = {"p": torch.tensor([0.1, 0.2, 0.3, 0.4])}
    tau_out = {"p": torch.tensor([-1.0, -2.0, -3.0, -4.0])}
    m_in = {"p": torch.tensor([True, True, False, False])}
    m_out = {"p": torch.tensor([True, False, True, False])}
    return anchor, tau_in, tau_out, m_in, m_out


def test_masked_fusion_eq9_and_ablations():
    anchor, tau_in, tau_out, m_in, m_out = _vectors()
    fused = fusion.masked_fusion(anchor, tau_in, tau_out, m_in, m_out)["p"]
    assert torch.allclose(fused, torch.tensor([1 + 0.1 - 1, 1 + 0.2, 1 - 3, 1.0]))
    # -Share: only the shared element loses its inner update
    no_share = fusion.drop_shared(m_in, m_out)["p"]
    assert no_share.tolist() == [False, True, False, False]
    # -KI: both task vectors in full
    assert torch.allclose(fusion.sum_fusion(anchor, tau_in, tau_out)["p"],
                          torch.tensor([0.1, -0.8, -1.7, -2.6]))
    # all-ones masks == no masking
    ones = {"p": torch.ones(4, dtype=torch.bool)}
    assert torch.equal(fusion.masked_fusion(anchor, tau_in, tau_out, ones, ones)["p"],
                       fusion.sum_fusion(anchor, tau_in, tau_out)["p"])


def test_global_adaptive_and_release_weights():
    i_in, i_out = {"p": torch.tensor([1.0, 3.0])}, {"p": torch.tensor([2.0, 2.0])}
    assert fusion.global_weights(i_in, i_out) == (0.5, 0.5)
    assert fusion.global_weights({"p": torch.tensor([3.0])}, {"p": torch.tensor([1.0])}) == (0.75, 0.25)
    w_in, w_out = fusion.adaptive_weights({"p": torch.tensor([0.0, 1.0, 2.0])}, {"p": torch.tensor([2.0, 1.0, 0.0])})
    a, b = torch.tensor([0.0, 0.5, 1.0]), torch.tensor([1.0, 0.5, 0.0])              # min-max normalised
    assert torch.allclose(w_in["p"], a.exp() / (a.exp() + b.exp()))
    assert torch.allclose(w_in["p"] + w_out["p"], torch.ones(3))
    _, _, _, m_in, m_out = _vectors()
    w_in, w_out = fusion.release_weights(m_in, m_out)
    assert torch.allclose(w_in["p"], torch.tensor([0.4, 1.0, 0.0, 0.5]))
    assert torch.allclose(w_out["p"], torch.tensor([0.6, 0.0, 1.0, 0.5]))


def test_region_fractions_partition():
    _, _, _, m_in, m_out = _vectors()
    assert fusion.region_fractions(m_in, m_out) == {"in_only": 0.25, "out_only": 0.25, "shared": 0.25,
                                                    "neither": 0.25}
