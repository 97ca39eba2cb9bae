"""main_knn.py: the weighted k-NN classifier against a brute-force loop, tie-breaks, determinism, 2 processes."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import torch

from conftest import run_script, run_torchrun

import main_knn
import models_mae
from util.datasets import DigitsDataset


def brute_force_knn(bank: np.ndarray, labels: np.ndarray, queries: np.ndarray, num_classes: int, k: int,
                    temperature: float) -> list[list[int]]:
    """The protocol written out as loops: cosine similarities, the k nearest (lower index first on ties),
    votes exp(s / T) per class, classes by votes (lower class first on ties)."""
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    ranked = []
    for q in queries:
        sims = [float(np.dot(q, b)) for b in bank]
        nearest = sorted(range(len(bank)), key=lambda i: (-sims[i], i))[:k]
        votes = [0.0] * num_classes
        for i in nearest:
            votes[int(labels[i])] += math.exp(sims[i] / temperature)
        ranked.append(sorted(range(num_classes), key=lambda c: (-votes[c], c))[:5])
    return ranked


def test_knn_equals_brute_force_reference():
    rng = np.random.default_rng(0)
    num_classes = 7
    centres = rng.normal(size=(num_classes, 12))
    bank_labels = rng.integers(0, num_classes, size=300)
    bank = centres[bank_labels] + 1.5 * rng.normal(size=(300, 12))
    query_labels = rng.integers(0, num_classes, size=80)
    queries = centres[query_labels] + 1.5 * rng.normal(size=(80, 12))
    for k, temperature in ((20, 0.07), (5, 0.5), (1, 0.07)):
        expected = brute_force_knn(bank, bank_labels, queries, num_classes, k, temperature)
        got = main_knn.knn_classify(torch.from_numpy(bank), torch.from_numpy(bank_labels), torch.from_numpy(queries),
                                    num_classes, k=k, temperature=temperature, chunk=32)
        assert got.tolist() == expected, (k, temperature)
    top1, top5 = main_knn.topk_accuracy(got, torch.from_numpy(query_labels))
    assert top1 == 100.0 * np.mean(got[:, 0].numpy() == query_labels)
    assert 0.0 < top1 <= top5 <= 100.0


def test_ties_are_broken_by_bank_index_then_class_index():
    # 1 query, 6 bank samples; similarities 0.5 (x3), 0.25 (x3); k = 2 takes bank 1 and 2 (lowest indices of 0.5)
    sim = torch.tensor([[0.25, 0.5, 0.5, 0.25, 0.5, 0.25]], dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 0, 0, 0])
    ranked = main_knn.knn_rank_classes(sim, labels, 3, k=2, temperature=0.1)
    assert ranked.tolist() == [[1, 2, 0]]  # classes 1 and 2 tie on votes: the lower class first; class 0 got none
    # k = 3 adds bank 4 (class 0): three equal votes -> class order
    assert main_knn.knn_rank_classes(sim, labels, 3, k=3, temperature=0.1).tolist() == [[0, 1, 2]]
    # scaling a query does not change cosine similarities: identical predictions
    bank = torch.eye(4, dtype=torch.float64)
    q = torch.tensor([[1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    a = main_knn.knn_classify(bank, torch.tensor([3, 2, 1, 0]), q, 4, k=2)
    b = main_knn.knn_classify(bank, torch.tensor([3, 2, 1, 0]), 7.0 * q, 4, k=2)
    assert a.tolist() == b.tolist() == [[2, 3, 0, 1]]


def _checkpoint(tmp_path) -> str:
    torch.manual_seed(0)
    model = models_mae.mae_vit_tiny_patch4(img_size=16)
    path = str(tmp_path / "checkpoint-0.pth")
    torch.save({"model": model.state_dict(), "epoch": 0,
                "args": {"model": "mae_vit_tiny_patch4", "input_size": 16}}, path)
    return path


def test_main_knn_deterministic_and_two_processes_equal_one(tmp_path):
    ckpt = _checkpoint(tmp_path)
    common = ["main_knn.py", "--checkpoint", ckpt, "--batch_size", "100", "--num_workers", "0"]
    one = run_script([*common, "--output_dir", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    again = run_script([*common, "--num_workers", "2", "--output_dir", str(tmp_path / "again")])
    assert again.returncode == 0, again.stderr[-3000:]
    two = run_torchrun(2, [*common, "--output_dir", str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr[-3000:]

    def load(name):
        with open(tmp_path / name / "summary.json") as f:
            return json.load(f), np.load(tmp_path / name / "predictions.npy")

    (s1, p1), (s_again, p_again), (s2, p2) = load("one"), load("again"), load("two")
    assert s1["mode"] == "knn" and s1["k"] == 20 and s1["temperature"] == 0.07
    assert s1["num_train"] == 1500 and s1["num_val"] == 297 and p1.shape == (297, 5)
    assert s1["world_size"] == 1 and s2["world_size"] == 2
    assert np.array_equal(p1, p_again) and np.array_equal(p1, p2)
    for key in ("top1", "top5"):
        assert s1[key] == s_again[key] == s2[key]
    # the accuracy is the predictions' (and better than chance: a random encoder still clusters digits)
    labels = np.asarray(DigitsDataset(train=False).targets)
    assert s1["top1"] == 100.0 * np.mean(p1[:, 0] == labels)
    assert s1["top1"] > 30.0


def test_main_knn_rejects_bad_input(tmp_path):
    missing = run_script(["main_knn.py", "--checkpoint", str(tmp_path / "nope.pth"), "--output_dir", str(tmp_path)])
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "Fix:" in missing.stderr
    ckpt = _checkpoint(tmp_path)
    wrong = run_script(["main_knn.py", "--checkpoint", ckpt, "--input_size", "32", "--output_dir", str(tmp_path)])
    assert wrong.returncode == 2 and "does not fit" in wrong.stderr
    bad_k = run_script(["main_knn.py", "--checkpoint", ckpt, "--k", "0"])
    assert bad_k.returncode == 2 and "--k must be >= 1" in bad_k.stderr


def test_k_and_temperature_flags_reach_the_classifier(tmp_path):
    """--k and --temperature must reach the classifier, shown by values whose predictions are known without the
    features: --k 100000 (every bank sample votes) with --temperature 1e9 (each vote exp(s / T) = 1 + O(1e-9)) gives
    every query the same ranking, the classes by their bank counts (digits train split: 0:157, 4:156, 6:153, 3:152,
    then 2 and 9 with 150 each). With either flag ignored (k = 20 or T = 0.07) the nearest neighbours dominate and
    the rankings differ from query to query."""
    ckpt = _checkpoint(tmp_path)
    out = tmp_path / "all"
    assert main_knn.cli(["--checkpoint", ckpt, "--batch_size", "300", "--num_workers", "0", "--k", "100000",
                         "--temperature", "1e9", "--output_dir", str(out)]) == 0
    with open(out / "summary.json") as f:
        summary = json.load(f)
    ranked = np.load(out / "predictions.npy")
    assert summary["k"] == 100000 and summary["temperature"] == 1e9
    assert (ranked[:, :4] == [0, 4, 6, 3]).all()
    assert set(ranked[:, 4].tolist()) <= {2, 9}
    assert summary["top1"] == 100.0 * np.mean(np.asarray(DigitsDataset(train=False).targets) == 0)
