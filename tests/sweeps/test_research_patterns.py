"""The research report's checks pass and fail on the numbers they are given (hand-made rows)."""
import pytest

from sweeps.research_patterns import STATIC, dpo_checks, ppo_checks, sft_checks, window_gain


def row(**deltas):
    values = {c: 1.0 for c in STATIC} | {"greedy": 1.0} | deltas
    return {f"delta/{c}": v for c, v in values.items()}


def by_name(checks):
    return {c.name: c.passed for c in checks}


def test_sft_checks_follow_the_numbers():
    seed_study = row(chosen=20, rejected=5, paraphrase_chosen=15, paraphrase_rejected=4, variant=14, random=6, nonresponse=-2)
    assert all(by_name(sft_checks([seed_study])).values())
    contradicting = row(chosen=20, rejected=-5, nonresponse=3, variant=-1)
    result = by_name(sft_checks([contradicting]))
    assert result == {"sft.chosen_rises": True, "sft.rejected_rises_too": False,
                      "sft.paraphrases_and_variant_rise": False, "sft.nonresponse_rises_least": False}
    # averaged over seeds: one seed's rejected rise does not outweigh a larger fall
    assert not by_name(sft_checks([row(rejected=2), row(rejected=-6)]))["sft.rejected_rises_too"]


def dpo_row(beta, recipe, chosen, rejected, greedy=1.0):
    return {"beta": beta, "sft_recipe": recipe, **row(chosen=chosen, rejected=rejected, greedy=greedy,
                                                      paraphrase_rejected=-1, random=-0.5, nonresponse=-0.5)}


def test_dpo_checks_squeezing_beta_and_recipe():
    rows = [dpo_row(0.05, "chosen", -3, -30), dpo_row(0.2, "chosen", -2, -20), dpo_row(0.8, "chosen", -1, -8),
            dpo_row(0.05, "both", 2, -25), dpo_row(0.2, "both", 1, -15), dpo_row(0.8, "both", 0.5, -6)]
    result = by_name(dpo_checks(rows))
    assert result == {"dpo.rejected_falls_most": True, "dpo.chosen_falls_too": True, "dpo.greedy_rises": True,
                      "dpo.beta_dependence": True, "dpo.sft_both_softens_squeezing": True}
    no_squeeze = [dpo_row(0.05, "chosen", 3, -30), dpo_row(0.2, "chosen", -2, -10), dpo_row(0.8, "chosen", -1, -20, greedy=-1),
                  dpo_row(0.05, "both", 1, -25), dpo_row(0.2, "both", -5, -15), dpo_row(0.8, "both", -4, -6)]
    result = by_name(dpo_checks(no_squeeze))
    assert result == {"dpo.rejected_falls_most": True, "dpo.chosen_falls_too": False, "dpo.greedy_rises": False,
                      "dpo.beta_dependence": False, "dpo.sft_both_softens_squeezing": False}
    # two β values are always monotone: the check is reported as not measured, not as a pass
    two = by_name(dpo_checks([dpo_row(0.1, "chosen", -3, -30), dpo_row(0.5, "chosen", -3, -30.01)]))
    assert two["dpo.beta_dependence"] is None
    # rejected must be the lowest category: a paraphrase falling further fails the check
    assert not by_name(dpo_checks([dpo_row(0.1, "chosen", -0.2, -0.8)]))["dpo.rejected_falls_most"]


def test_ppo_checks_reward_gain_and_kl_order():
    rising = [0.0] * 5 + [0.5] * 5
    runs = [{"kl_coef": 0.01, "seed": 0, "reward": rising, "kl": [0, 0, 0, 0, 4]},
            {"kl_coef": 0.2, "seed": 0, "reward": rising, "kl": [0, 0, 0, 0, 1]}]
    checks = ppo_checks(runs)
    assert by_name(checks) == {"ppo.reward_rises": True, "ppo.kl_grows_more_with_smaller_coef": True}
    flat = [dict(r, reward=[0.3] * 10) for r in runs]
    assert by_name(ppo_checks(flat))["ppo.reward_rises"] is False
    swapped = [dict(runs[0], kl=[1] * 5), dict(runs[1], kl=[4] * 5)]
    assert by_name(ppo_checks(swapped))["ppo.kl_grows_more_with_smaller_coef"] is False
    assert ppo_checks(swapped)[-1].note == "KL ended higher with the larger coefficient"
    noise = [dict(runs[0], kl=[-0.04] * 5), dict(runs[1], kl=[-0.001] * 5)]  # k1 estimates of an unmoved policy
    assert by_name(ppo_checks(noise))["ppo.kl_grows_more_with_smaller_coef"] is False
    assert "sampling noise" in ppo_checks(noise)[-1].note
    assert window_gain(rising) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        window_gain([1.0] * 9)
