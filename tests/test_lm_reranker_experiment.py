"""The language-model experiment (benchmarks/experiment_lm_reranker.py) calibrates on the features the runtime
stage computes (tests/grounding/test_lm_reranker.py checks the runtime's): the best candidate's log-softmax
share over its row's candidates (NaN-padded rows: padding takes no share) and its reranker logit, checked
against torch's log_softmax; and its top-n counts a row right when any of its best n is right."""

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from experiment_lm_reranker import calibration_features, combined, top1, topn  # noqa: E402


def test_calibration_features_are_the_best_candidates_log_softmax_share():
    rng = np.random.default_rng(3)
    values = rng.normal(0, 5, (40, 10))
    values[::3, 7:] = np.nan  # rows with fewer candidates
    rl = rng.normal(0, 2, (40, 10))
    best, features = calibration_features(values, rl)
    for row in range(len(values)):
        valid = ~np.isnan(values[row])
        shares = torch.log_softmax(torch.tensor(values[row][valid]), 0).numpy()
        assert best[row] == int(np.argmax(values[row][valid]))
        np.testing.assert_allclose(features[row], [shares.max(), rl[row, best[row]]], rtol=1e-12, atol=1e-12)


def test_top_n():
    values = np.array([[3.0, 2.0, 1.0], [1.0, 2.0, np.nan], [0.0, 5.0, 1.0]])
    right = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert top1(values, right) == 1 / 3
    assert topn(values, right, 2) == 1.0
    assert topn(values, right, 1) == top1(values, right)


def test_combined_reorders_only_the_best_k_of_the_earlier_order():
    base = np.array([[5.0, 4.0, 3.0, 2.0, np.nan], [1.0, 3.0, 2.0, 0.0, -1.0]])
    ll = np.array([[-9.0, -1.0, 0.0, 0.0, 0.0], [0.0, -9.0, 0.0, 0.0, 9.0]])
    values, head = combined(base, ll, 1.0, 2)
    # row 0: the best 2 by base are columns 0 and 1 -> -4 and 3; the others stay below in base order
    assert np.argsort(-np.nan_to_num(values[0], nan=-np.inf), kind="stable").tolist()[:4] == [1, 0, 2, 3]
    assert np.isnan(values[0, 4])
    # row 1: the best 2 are columns 1 and 2 -> -6 and 2; column 4's large ll is never read
    assert np.argsort(-values[1], kind="stable").tolist() == [2, 1, 0, 3, 4]
    assert np.isnan(head).sum(axis=1).tolist() == [3, 3]
    np.testing.assert_array_equal(head[1, [1, 2]], [-6.0, 2.0])
