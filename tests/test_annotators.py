"""Annotator statistics, shrinkage, Dawid-Skene and AUROC against hand-computed or planted truths."""
import numpy as np
import polars as pl
import pytest

from prefcurate.curation.labels.annotators import (
    AnnotatorStatsConfig,
    annotator_stats,
    auroc,
    beta_prior_strength,
    dawid_skene_pairs,
)


# Three annotators on images x, y, z. Items (unordered pairs): {x, y} and {y, z} and {x, z}.
#   u1: p1 (x, y) picks x; p2 (y, z) picks z; p3 (x, z) tie
#   u2: p4 (y, x) picks x; p5 (z, y) picks z
#   u3: p6 (x, y) picks y
PAIRS = pl.DataFrame({
    "pair_id": ["p1", "p2", "p3", "p4", "p5", "p6"],
    "user_id": ["u1", "u1", "u1", "u2", "u2", "u3"],
    "label_0": [1.0, 0.0, 0.5, 0.0, 1.0, 0.0],
    "image_0_id": ["x", "y", "x", "y", "z", "x"],
    "image_1_id": ["y", "z", "z", "x", "y", "y"],
})
# Scorer majority (votes_for_0 / n_scorers): p1 3/4 -> image_0, p2 1/4 -> image_1, p3 split,
# p4 1/4 -> image_1, p5 split, p6 3/4 -> image_0.
CONSENSUS = pl.DataFrame({
    "pair_id": ["p1", "p2", "p3", "p4", "p5", "p6"],
    "n_scorers": [4, 4, 4, 4, 4, 4],
    "votes_for_0": [3.0, 1.0, 2.0, 1.0, 2.0, 3.0],
    "consensus_label": [1.0, 0.0, None, 0.0, 1.0, 1.0],
})
PAIR_METRICS = pl.DataFrame({
    "pair_id": ["p1", "p2", "p3", "p4", "p5", "p6"],
    "minority_score": [0.1, 0.2, None, 0.1, 0.6, 0.9],
})


def by_user(stats: pl.DataFrame) -> dict[str, dict]:
    return {r["user_id"]: r for r in stats.iter_rows(named=True)}


def test_hand_computed_rates_and_agreements():
    stats = by_user(annotator_stats(PAIRS, CONSENSUS, PAIR_METRICS))
    u1, u2, u3 = stats["u1"], stats["u2"], stats["u3"]
    assert (u1["n_labels"], u1["n_ties"], u1["tie_rate"]) == (3, 1, pytest.approx(1 / 3))
    assert (u1["left_rate"], u2["left_rate"], u3["left_rate"]) == (0.5, 0.5, 0.0)
    # agreement with the scorer majority: u1 2/2, u2 1/1 (p5 is split), u3 0/1
    assert [s["consensus_agreement"] for s in (u1, u2, u3)] == [1.0, 1.0, 0.0]
    assert [s["n_reference"] for s in (u1, u2, u3)] == [2, 1, 1]
    # peers: u1 on {x,y} meets u2 (agrees) and u3 (disagrees), on {y,z} meets u2 (agrees): 2/3
    assert (u1["peer_agreement"], u1["n_peer_pairs"]) == (pytest.approx(2 / 3), 2)
    assert (u2["peer_agreement"], u2["n_peer_pairs"]) == (pytest.approx(2 / 3), 2)
    assert (u3["peer_agreement"], u3["n_peer_pairs"]) == (0.0, 1)
    assert (u1["mean_minority_score"], u1["minority_rate"]) == (pytest.approx(0.15), 0.0)
    assert (u2["mean_minority_score"], u2["minority_rate"]) == (pytest.approx(0.35), 0.5)
    assert (u3["mean_minority_score"], u3["minority_rate"]) == (pytest.approx(0.9), 1.0)
    assert u3["reliability"] < min(u1["reliability"], u2["reliability"])


def test_consensus_label_reference_and_method_switch():
    config = AnnotatorStatsConfig(agreement_reference="consensus_label", reliability_method="dawid_skene")
    stats = annotator_stats(PAIRS, CONSENSUS, PAIR_METRICS, config)
    u2 = by_user(stats)["u2"]
    assert (u2["consensus_agreement"], u2["n_reference"]) == (1.0, 2)  # p5 now has a reference (1.0)
    assert stats["reliability"].to_list() == stats["reliability_dawid_skene"].to_list()
    assert stats["reliability_method"].unique().to_list() == ["dawid_skene"]


def test_agreement_weighted_by_the_scorer_vote_margin():
    # agrees with a unanimous vote (weight |2 * 4/4 - 1| = 1), disagrees with a 3-of-4 vote (weight 1/2)
    pairs = PAIRS.head(2).with_columns(user_id=pl.lit("solo"), label_0=pl.Series([1.0, 0.0]))
    consensus = CONSENSUS.head(2).with_columns(votes_for_0=pl.Series([4.0, 3.0]))
    weighted = annotator_stats(pairs, consensus, PAIR_METRICS)
    plain = annotator_stats(pairs, consensus, PAIR_METRICS, AnnotatorStatsConfig(agreement_weighting="none"))
    assert weighted["consensus_agreement"].item() == pytest.approx(1 / 1.5)
    assert plain["consensus_agreement"].item() == 0.5 and plain["n_reference"].item() == 2


def test_same_user_twice_on_an_item_is_not_a_peer():
    pairs = PAIRS.with_columns(user_id=pl.lit("solo"))
    assert by_user(annotator_stats(pairs, CONSENSUS, PAIR_METRICS))["solo"]["n_peer_pairs"] == 0


def test_beta_prior_method_of_moments_by_hand():
    # k/n = 2/10, 8/10: mu = 0.5, S = 0.09, m = 0.1, tau^2 = (0.09 - 0.025) / 0.9, strength = 0.25 / tau^2 - 1
    mu, strength = beta_prior_strength(np.array([2, 8]), np.array([10, 10]), lo=1.0, hi=1000.0)
    assert mu == 0.5 and strength == pytest.approx(0.25 / (0.065 / 0.9) - 1)
    # identical rates: no between-annotator variance, the upper clip applies
    assert beta_prior_strength(np.array([5, 5]), np.array([10, 10]), lo=1.0, hi=77.0) == (0.5, 77.0)
    # one annotator: the between-annotator spread is unknown, the weakest prior applies
    assert beta_prior_strength(np.array([1.5]), np.array([2.0]), lo=3.0, hi=77.0) == (0.75, 3.0)


def test_shrinkage_pulls_a_two_label_annotator_toward_the_population():
    rng = np.random.default_rng(0)
    rows, consensus = [], []
    accuracies = rng.uniform(0.65, 0.85, 20)
    for j, accuracy in enumerate(accuracies):  # 20 annotators x 100 labels, the reference always image_0
        for i in range(100):
            rows.append((f"w{j}", float(rng.random() < accuracy)))
    rows += [("newcomer", 0.0), ("newcomer", 0.0)]  # disagrees twice
    pairs = pl.DataFrame({
        "pair_id": [f"p{i}" for i in range(len(rows))], "user_id": [u for u, _ in rows],
        "label_0": [y for _, y in rows],
        "image_0_id": [f"a{i}" for i in range(len(rows))], "image_1_id": [f"b{i}" for i in range(len(rows))],
    })
    consensus = pairs.select("pair_id", n_scorers=pl.lit(3), votes_for_0=pl.lit(3.0), consensus_label=pl.lit(1.0))
    metrics = pairs.select("pair_id", minority_score=pl.lit(0.0))
    stats = by_user(annotator_stats(pairs, consensus, metrics, AnnotatorStatsConfig(left_penalty=0.0)))
    population = sum(stats[f"w{j}"]["consensus_agreement"] for j in range(20)) / 20
    newcomer = stats["newcomer"]
    assert newcomer["consensus_agreement"] == 0.0
    assert newcomer["agreement_shrunk"] > 0.6 * population  # pulled most of the way back
    veteran = stats["w0"]
    assert abs(veteran["agreement_shrunk"] - veteran["consensus_agreement"]) < 0.05  # 100 labels barely move


def planted_crowd(seed: int, n_items: int = 2000, labels_per_item: int = 5):
    """30 workers with planted symmetric accuracies plus one position-biased worker (index 30)."""
    rng = np.random.default_rng(seed)
    accuracy = rng.uniform(0.55, 0.95, 30)
    first_better = rng.random(n_items) < 0.5  # latent winner of each item
    worker = np.concatenate([rng.choice(31, labels_per_item, replace=False) for _ in range(n_items)])
    item = np.repeat(np.arange(n_items), labels_per_item)
    flipped = rng.random(item.size) < 0.5  # the item's second image shown as image_0
    image_0_better = first_better[item] != flipped
    correct = rng.random(item.size) < np.append(accuracy, 0.5)[worker]
    chose_0 = np.where(correct, image_0_better, ~image_0_better)
    biased = worker == 30
    chose_0[biased] = rng.random(biased.sum()) < 0.9
    return worker, item, flipped, chose_0, accuracy, first_better


def test_dawid_skene_recovers_planted_accuracies():
    worker, item, flipped, chose_0, accuracy, first_better = planted_crowd(seed=1)
    sens, spec, posterior = dawid_skene_pairs(worker, item, flipped, chose_0, np.full(first_better.size, 0.5))
    balanced = (sens + spec) / 2
    assert np.abs(balanced[:30] - accuracy).mean() < 0.035  # ~320 labels a worker: sampling error ~0.025
    assert np.corrcoef(balanced[:30], accuracy)[0, 1] > 0.93
    assert sens[30] > 0.8 and spec[30] < 0.2 and abs(balanced[30] - 0.5) < 0.06  # position bias, no skill
    assert ((posterior > 0.5) == first_better).mean() > 0.9


def test_dawid_skene_uses_the_prior_when_every_item_has_one_label():
    worker, item, flipped, chose_0, accuracy, first_better = planted_crowd(seed=2, n_items=3000, labels_per_item=1)
    informative = np.where(first_better, 0.8, 0.2)  # scorers right 100 % of the time, at 80 % confidence
    sens, spec, _ = dawid_skene_pairs(worker, item, flipped, chose_0, informative)
    # with one label per item only the prior identifies a worker: P(agree with the 0.8 side) =
    # 0.8 a + 0.2 (1 - a). The prior is under-confident here (it is always right), so the
    # scale of a is overstated, but the ranking of the workers is kept.
    balanced = (sens + spec) / 2
    assert np.corrcoef(balanced[:30], accuracy)[0, 1] > 0.85
    assert balanced[30] < np.median(balanced[:30])


def test_auroc_by_hand_with_ties():
    # positives 0.35, 0.8 vs negatives 0.1, 0.4: wins (0.35>0.1), (0.8>0.1), (0.8>0.4) = 3 of 4
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([False, False, True, True])) == 0.75
    # a tie counts 1/2: positive 1 vs negatives 1 (tie) and 2 (loss) = 0.5 / 2
    assert auroc(np.array([1.0, 1.0, 2.0]), np.array([True, False, False])) == 0.25
    assert auroc(np.array([3.0, 3.0]), np.array([True, False])) == 0.5
    with pytest.raises(ValueError, match="positives and negatives"):
        auroc(np.array([1.0, 2.0]), np.array([True, True]))
    with pytest.raises(ValueError, match="NaN"):
        auroc(np.array([np.nan, 2.0]), np.array([True, False]))


def test_empty_in_empty_out():
    stats = annotator_stats(PAIRS.clear(), CONSENSUS.clear(), PAIR_METRICS.clear())
    assert stats.height == 0 and "reliability" in stats.columns


def test_config_rejects_unknown_choices():
    with pytest.raises(ValueError, match="reliability_method"):
        AnnotatorStatsConfig(reliability_method="vibes")
    with pytest.raises(ValueError, match="agreement_reference"):
        AnnotatorStatsConfig(agreement_reference="oracle")


def crowd_frames(seed: int, n_items: int = 1500, labels_per_item: int = 3):
    """pairs/consensus/pair_metrics frames of a planted crowd: workers 0-9 reliable (accuracy 0.9),
    10-13 spammers (uniform random), 14-17 position-biased (image_0 with probability 0.85, else
    accurate). Two scorers that agree with the truth 75 % of the time each."""
    rng = np.random.default_rng(seed)
    n_workers = 18
    first_better = rng.random(n_items) < 0.5
    worker = np.concatenate([rng.choice(n_workers, labels_per_item, replace=False) for _ in range(n_items)])
    item = np.repeat(np.arange(n_items), labels_per_item)
    flipped = rng.random(item.size) < 0.5
    image_0_better = first_better[item] != flipped
    correct = rng.random(item.size) < 0.9
    chose_0 = np.where(correct, image_0_better, ~image_0_better)
    spam = (worker >= 10) & (worker < 14)
    chose_0[spam] = rng.random(spam.sum()) < 0.5
    biased = worker >= 14
    chose_0[biased] = np.where(rng.random(biased.sum()) < 0.85, True, chose_0[biased])
    a, b = np.array([f"a{i:05d}" for i in item]), np.array([f"b{i:05d}" for i in item])  # a < b: a is "first"
    scorer_right = rng.random((item.size, 2)) < 0.75
    votes_for_0 = np.where(scorer_right, image_0_better[:, None], ~image_0_better[:, None]).sum(axis=1)
    pairs = pl.DataFrame({
        "pair_id": [f"p{r}" for r in range(item.size)], "user_id": [f"w{w:02d}" for w in worker],
        "label_0": chose_0.astype(float), "image_0_id": np.where(flipped, b, a), "image_1_id": np.where(flipped, a, b),
    })
    consensus = pairs.select("pair_id", n_scorers=pl.lit(2), votes_for_0=pl.Series(votes_for_0.astype(float)),
                             consensus_label=pl.lit(None, pl.Float64))
    return pairs, consensus, pairs.select("pair_id", minority_score=pl.lit(0.0))


def test_annotator_table_separates_reliable_spammer_and_position_biased():
    stats = by_user(annotator_stats(*crowd_frames(seed=3)))
    reliable = [stats[f"w{j:02d}"] for j in range(10)]
    spammers = [stats[f"w{j:02d}"] for j in range(10, 14)]
    biased = [stats[f"w{j:02d}"] for j in range(14, 18)]
    assert all(s["n_labels"] >= 200 for s in stats.values())
    for s in reliable:
        assert s["sensitivity"] > 0.8 and s["specificity"] > 0.8
    for s in spammers:
        assert abs(s["sensitivity"] + s["specificity"] - 1) < 0.15
    for s in biased:  # left with 0.85 + 0.15 * 0.9 = 0.985 when left is better, 0.15 * 0.9 when right is
        assert s["sensitivity"] > 0.9 and s["specificity"] < 0.3
    worst_reliable = min(s["reliability"] for s in reliable)
    assert max(s["reliability"] for s in spammers + biased) < worst_reliable


def rowwise_dawid_skene(worker, item, flipped, chose_0, prior_first, n_workers, strength=4.0, iterations=100):
    """The EM of `dawid_skene_pairs` written over rows, one label at a time (the test's oracle)."""
    def item_log_odds(sens, spec):
        log_odds = np.log(prior_first / (1 - prior_first))
        for j, i, f, c in zip(worker, item, flipped, chose_0):
            llr = np.log(sens[j] / (1 - spec[j])) if c else np.log((1 - sens[j]) / spec[j])
            log_odds[i] += -llr if f else llr
        return log_odds

    sens, spec = np.full(n_workers, 0.7), np.full(n_workers, 0.7)
    for _ in range(iterations):
        log_odds = item_log_odds(sens, spec)
        stats = np.zeros((n_workers, 4))  # q_sum, q_agree, n, n_chose_0
        for j, i, f, c in zip(worker, item, flipped, chose_0):
            q = 1 / (1 + np.exp(log_odds[i] if f else -log_odds[i]))  # P(the label's image_0 is better)
            stats[j] += [q, q * c, 1, c]
        q_sum, q_agree, n, n_chose_0 = stats.T
        not_agree = (n - n_chose_0) - (q_sum - q_agree)
        pooled_sens, pooled_spec = q_agree.sum() / q_sum.sum(), not_agree.sum() / (n - q_sum).sum()
        sens = ((q_agree + strength * pooled_sens) / (q_sum + strength)).clip(1e-4, 1 - 1e-4)
        spec = ((not_agree + strength * pooled_spec) / (n - q_sum + strength)).clip(1e-4, 1 - 1e-4)
    return sens, spec, 1 / (1 + np.exp(-item_log_odds(sens, spec)))


def test_dawid_skene_over_patterns_equals_the_rowwise_em():
    rng = np.random.default_rng(4)
    n_items = 300
    item = np.concatenate([np.arange(n_items), rng.integers(0, 60, 120)])  # items 0-59 get extra labels
    worker = rng.integers(0, 7, item.size)
    flipped, chose_0 = rng.random(item.size) < 0.5, rng.random(item.size) < 0.6
    prior = rng.choice([0.25, 0.5, 0.75], n_items)  # few distinct priors: single-label items share patterns
    got = dawid_skene_pairs(worker, item, flipped, chose_0, prior, n_workers=8, tol=0.0, max_iter=40)
    want = rowwise_dawid_skene(worker, item, flipped, chose_0, prior, n_workers=8, iterations=40)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-10)


def test_aligned_and_joined_inputs_give_the_same_table():
    aligned = annotator_stats(PAIRS, CONSENSUS, PAIR_METRICS)
    shuffled = annotator_stats(PAIRS.lazy(), CONSENSUS.reverse(), PAIR_METRICS.reverse())
    assert aligned.equals(shuffled)


def test_beta_binomial_falls_back_to_the_leave_one_out_peer_majority_without_scorers():
    # No scorer votes. Others' labels on each item (the annotator's own left out):
    #   u1: p1 {x,y} -> others u2 (x), u3 (y): split, no reference; p2 {y,z} picks z, others u2 (z): agrees
    #   u2: p4 {x,y} -> others u1 (x), u3 (y): split; p5 {y,z} picks z, others u1 (z): agrees
    #   u3: p6 {x,y} picks y, others u1 (x), u2 (x): disagrees with a unanimous majority
    no_votes = CONSENSUS.with_columns(n_scorers=pl.lit(0), votes_for_0=pl.lit(0.0), consensus_label=pl.lit(None))
    stats = by_user(annotator_stats(PAIRS, no_votes, PAIR_METRICS))
    assert [stats[u]["n_reference"] for u in ("u1", "u2", "u3")] == [0, 0, 0]
    assert [stats[u]["n_peer_majority"] for u in ("u1", "u2", "u3")] == [1, 1, 1]
    assert [stats[u]["peer_majority_agreement"] for u in ("u1", "u2", "u3")] == [1.0, 1.0, 0.0]
    assert stats["u3"]["agreement_shrunk"] < stats["u1"]["agreement_shrunk"] == stats["u2"]["agreement_shrunk"]
    off = by_user(annotator_stats(PAIRS, no_votes, PAIR_METRICS, AnnotatorStatsConfig(agreement_fallback="none")))
    assert off["u3"]["agreement_shrunk"] == off["u1"]["agreement_shrunk"]  # nothing to tell them apart
    assert [off[u]["n_peer_majority"] for u in ("u1", "u2", "u3")] == [0, 0, 0]
    # with scorer votes the scorer reference is used wherever it is decisive (p1, p2, p4, p6), peers elsewhere
    with_votes = by_user(annotator_stats(PAIRS, CONSENSUS, PAIR_METRICS))
    assert (with_votes["u2"]["n_reference"], with_votes["u2"]["n_peer_majority"]) == (1, 1)  # p4 scorers, p5 peers
    with pytest.raises(ValueError, match="agreement_fallback"):
        AnnotatorStatsConfig(agreement_fallback="guess")


# The crowd model of prefcurate.curation.labels.reliability: planted logistic truths and planted annotators.

def planted_taste_crowd(seed: int, n_items: int = 3000, minority_share: float = 0.4, n_workers: int = 20):
    """Items with 3 scorer margins x (I, 3) ~ N(0, 1) toward the first image. The majority's reward uses
    weights (2, 1, 0), a minority group (the last workers, ~minority_share of the labels) weights
    (0, 0, 3); every annotator picks by Bradley-Terry on its own taste, one label per item, shown in a
    random order. Workers 0-1 are spammers (coin flips)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_items, 3))
    majority, minority = np.array([2.0, 1.0, 0.0]), np.array([0.0, 0.0, 3.0])
    n_minority = int(round(minority_share * n_workers))
    worker = rng.integers(0, n_workers, n_items)  # one label per item, equal volumes
    item = np.arange(n_items)
    is_minority = worker >= n_workers - n_minority
    reward = np.where(is_minority, x @ minority, x @ majority)  # toward the item's first image
    first = rng.random(n_items) < 1 / (1 + np.exp(-reward))  # the annotator prefers the first image
    first[worker < 2] = rng.random((worker < 2).sum()) < 0.5
    flipped = rng.random(n_items) < 0.5
    chose_0 = first != flipped
    truth_first = x @ majority > 0
    return worker, item, flipped, chose_0, x, truth_first, n_workers - n_minority


def test_crowd_model_recovers_a_planted_logistic_truth_and_two_coin_annotators():
    """Raykar et al. 2010: the truth P(first better) = sigmoid(w . x) with w = (2, -1); annotators 0-4
    right 90 %, 5-9 right 70 %, 10-11 always pick image_0 (a = 1, b = 0); 2 labels per item."""
    from prefcurate.curation.labels.reliability_em import fit_crowd_model

    rng = np.random.default_rng(0)
    n_items = 4000
    x = rng.normal(size=(n_items, 2))
    truth = rng.random(n_items) < 1 / (1 + np.exp(-(x @ np.array([2.0, -1.0]))))
    item = np.repeat(np.arange(n_items), 2)
    worker = rng.integers(0, 12, item.size)
    flipped = rng.random(item.size) < 0.5
    image_0_better = truth[item] != flipped
    accuracy = np.where(worker < 5, 0.9, 0.7)
    chose_0 = np.where(rng.random(item.size) < accuracy, image_0_better, ~image_0_better)
    chose_0[worker >= 10] = True
    fit = fit_crowd_model(worker, item, flipped, chose_0, x, n_workers=12)
    assert fit.weight[0] > 0 > fit.weight[1] and fit.weight[0] / -fit.weight[1] == pytest.approx(2.0, rel=0.25)
    planted = np.r_[[0.9] * 5, [0.7] * 5]  # ~330 labels per worker and side: sampling error ~0.025
    np.testing.assert_allclose(fit.sensitivity[:10], planted, atol=0.08)
    np.testing.assert_allclose(fit.specificity[:10], planted, atol=0.08)
    assert (fit.sensitivity[10:] > 0.97).all() and (fit.specificity[10:] < 0.03).all()
    loo = (fit.loo_sensitivity + fit.loo_specificity) / 2
    assert loo[:5].min() > loo[5:10].max() and loo[5:10].min() > loo[10:].max()
    assert ((fit.log_odds > 0) == truth).mean() > 0.85
    # no features: plain two-coin Dawid-Skene (the prior is flat), the same a, b ranking
    plain = fit_crowd_model(worker, item, flipped, chose_0, np.zeros((n_items, 0)), n_workers=12)
    assert plain.weight.size == 0 and (plain.prior_log_odds == 0).all()
    assert ((plain.sensitivity + plain.specificity)[:5].min() > (plain.sensitivity + plain.specificity)[5:].max())


def test_leave_one_out_confusion_does_not_let_a_label_confirm_itself():
    """One label per item and no features: without its own label an item has no evidence at all, so the
    leave-one-out confusion has nothing to go on and stays at the pooled values for everyone, while the
    in-sample a, b are moved by the annotator's own labels."""
    from prefcurate.curation.labels.reliability_em import fit_crowd_model

    rng = np.random.default_rng(1)
    worker = np.repeat(np.arange(3), 50)
    chose_0 = np.r_[np.ones(50, bool), rng.random(100) < 0.5]
    fit = fit_crowd_model(worker, np.arange(150), np.zeros(150, bool), chose_0, np.zeros((150, 0)), n_workers=3)
    assert fit.loo_sensitivity.tolist() == [fit.loo_sensitivity[0]] * 3
    assert fit.loo_specificity.tolist() == [fit.loo_specificity[0]] * 3


def test_annotator_tastes_recover_a_planted_taste_and_position_intercept():
    from prefcurate.curation.labels.reliability_taste import annotator_tastes

    rng = np.random.default_rng(2)
    x = rng.normal(size=(6000, 2))
    worker = np.repeat(np.arange(2), 3000)
    taste = np.array([[1.5, 0.0], [0.0, -1.0]])
    intercept = np.array([0.0, 1.0])  # worker 1 leans to image_0
    chose_0 = rng.random(6000) < 1 / (1 + np.exp(-(intercept[worker] + np.einsum("rk,rk->r", x, taste[worker]))))
    fit = annotator_tastes(worker, chose_0, x, n_workers=3)
    np.testing.assert_allclose(fit.taste[:2], taste, atol=0.12)
    np.testing.assert_allclose(fit.intercept[:2], intercept, atol=0.12)
    assert (fit.taste[2] == 0).all() and fit.intercept[2] == 0  # no labels: the ridge prior's mode
    # the profiled curvature: about n E[p (1 - p) x x^T] for 3000 labels, less what the intercept explains
    assert (np.linalg.eigvalsh(fit.precision[:2]) > 100).all() and fit.precision[2].tolist() == [[1, 0], [0, 1]]


def test_weighted_median_by_hand():
    from prefcurate.curation.labels.reliability_taste import weighted_median

    values = np.array([[1.0, 10.0], [2.0, 30.0], [3.0, 20.0]])
    assert weighted_median(values, np.array([1, 1, 1])).tolist() == [2.0, 20.0]
    # a group holding more than half of the weight decides, however far the others lie
    assert weighted_median(values, np.array([6, 1, 4])).tolist() == [1.0, 10.0]
    assert weighted_median(np.zeros((0, 2)), np.zeros(0)).tolist() == [0.0, 0.0]


def test_taste_mixture_keeps_the_majority_taste_and_finds_the_minority_group():
    """A consistent minority taste with 40 % of the labels: the majority taste is the one of the other 60 %
    (direction (2, 1, 0), not a compromise with the minority's (0, 0, 3)), the minority's members get a
    small rho, and so does a spammer (it belongs to the no-taste component)."""
    from prefcurate.curation.labels.reliability_taste import taste_mixture

    worker, item, flipped, chose_0, x, truth_first, first_minority = planted_taste_crowd(seed=3)
    x_label = x[item] * np.where(flipped, -1.0, 1.0)[:, None]  # toward the label's image_0
    w, rho, n_tastes = taste_mixture(worker, chose_0, x_label, n_workers=20)
    assert n_tastes == 2
    assert w[0] / np.linalg.norm(w) > 0.85 and abs(w[2]) < 0.2 * np.linalg.norm(w)
    assert rho[2:first_minority].min() > 0.9 and rho[first_minority:].max() < 0.1 and rho[:2].max() < 0.1
    # without a minority group, the BIC keeps a single taste and every consistent annotator shares it
    worker, item, flipped, chose_0, x, _, _ = planted_taste_crowd(seed=4, minority_share=0.0)
    w, rho, n_tastes = taste_mixture(worker, chose_0, x[item] * np.where(flipped, -1.0, 1.0)[:, None], n_workers=20)
    assert n_tastes == 1 and rho[2:].min() > 0.9 and w[0] > w[1] > abs(w[2])


def test_label_model_detects_a_minority_taste_group_below_half_of_the_labels():
    """End to end on frames: the minority's effective confusion is uninformative (a' + b' ~ 1) and its
    reliability below every reliable annotator's; its labels' evidence about the majority's truth ~ 0."""
    from prefcurate.curation.labels.reliability import label_model

    worker, item, flipped, chose_0, x, truth_first, first_minority = planted_taste_crowd(seed=5)
    a, b = np.array([f"a{i:05d}" for i in item]), np.array([f"b{i:05d}" for i in item])  # a < b: a is "first"
    ids = [f"p{i:05d}" for i in item]
    pairs = pl.DataFrame({"pair_id": ids, "user_id": [f"u{w:02d}" for w in worker], "label_0": chose_0.astype(float),
                          "image_0_id": np.where(flipped, b, a), "image_1_id": np.where(flipped, a, b)})
    margin_0 = x * np.where(flipped, -1.0, 1.0)[:, None]  # (I, 3) toward each pair's image_0
    votes = pl.DataFrame({"pair_id": ids * 3, "scorer": np.repeat(["s0", "s1", "s2"], item.size),
                          "normalized_margin": margin_0.T.ravel()}).with_columns(
        vote=pl.when(pl.col("normalized_margin") > 0).then(1.0).otherwise(0.0))
    per_pair, per_scorer, annotators = label_model(pairs, votes)
    w = per_scorer["weight"].to_numpy()
    assert w[0] > w[1] > abs(w[2])
    rel = annotators["reliability"].to_numpy()
    minority, reliable = rel[first_minority:], rel[2:first_minority]
    assert minority.max() < reliable.min() and abs(minority - 0.5).max() < 0.05
    effective = (annotators["sensitivity"] + annotators["specificity"]).to_numpy()
    assert np.abs(effective[first_minority:] - 1).max() < 0.05 and effective[2:first_minority].min() > 1.3
    minority_rows = worker >= first_minority
    assert per_pair["label_log_odds"].to_numpy()[minority_rows].__abs__().max() < 0.1
    calibrated = per_pair["calibrated_label"].to_numpy() == 1.0
    assert (calibrated == (truth_first != flipped)).mean() > 0.95  # the majority truth from the scorers


def test_capped_rows_water_fills_the_heaviest_annotators():
    from prefcurate.curation.labels.reliability_taste import capped_rows

    worker = np.array([0] * 10 + [1] * 3 + [2] * 1)  # 14 rows; a cap of 5 keeps 5 + 3 + 1 = 9
    kept = capped_rows(worker, 3, 9)
    assert kept.tolist() == [0, 1, 2, 3, 4, 10, 11, 12, 13]  # annotator 0's first 5 rows, all of the others
    assert capped_rows(worker, 3, 14).tolist() == list(range(14))
    assert np.bincount(worker[capped_rows(worker, 3, 5)], minlength=3).tolist() == [2, 2, 1]
