"""The public helper modules of docs/plugins.md: documented names exist, and each helper is right
against an independent reference (scikit-learn, hashlib, hand-computed cases)."""

from __future__ import annotations

import hashlib
import importlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score

from medaudit.errors import one_line
from medaudit.hashing import sha256_file, sha256_files
from medaudit.metric import MetricContext, class_names
from medaudit.ranking import auroc_from_sums, binary_roc_sums, tie_groups
from medaudit.scoring import negative_log_likelihood
from medaudit.weighted import group_sums, safe_div

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"


def documented_helpers() -> list[tuple[str, str]]:
    """``(module, name)`` of every `` `name(` `` in the rows of the helper-module table."""
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index("### Helper modules for metrics"):]
    section = section[: section.index("\n## ")]
    out = []
    for row in re.findall(r"^\| `(medaudit\.[a-z_]+)` \|(.*)\|$", section, re.MULTILINE):
        module, cell = row
        out.extend((module, name) for name in re.findall(r"`([a-z_][a-z0-9_]*)[`(]", cell) if name not in {"ece", "mce", "ace", "nll"})
    return list(dict.fromkeys(out))


def test_the_table_lists_the_new_modules() -> None:
    modules = {m for m, _ in documented_helpers()}
    assert {"medaudit.weighted", "medaudit.ranking", "medaudit.binning", "medaudit.scoring", "medaudit.hashing"} <= modules


@pytest.mark.parametrize(("module", "name"), documented_helpers())
def test_documented_helper_exists_with_a_docstring(module: str, name: str) -> None:
    obj = getattr(importlib.import_module(module), name)
    if callable(obj):
        assert obj.__doc__ and len(obj.__doc__.strip()) > 40, f"{module}.{name} needs a real docstring"


def test_safe_div_is_nan_where_undefined() -> None:
    out = safe_div(torch.tensor([1.0, 2.0, 0.0]), torch.tensor([2.0, 0.0, 0.0]))
    assert out[0].item() == 0.5 and torch.isnan(out[1:]).all()


def test_group_sums_fixed_and_per_row_groups_against_a_loop() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randint(0, 4, (3, 7), generator=g).double()
    x = torch.rand(7, generator=g, dtype=torch.float64)
    fixed = torch.tensor([0, 2, 2, 1, 0, 2, 1])
    per_row = torch.randint(0, 3, (3, 7), generator=g)
    for grp in (fixed, per_row):
        got = group_sums(w, grp, 3, x)
        want = torch.zeros(3, 3, dtype=torch.float64)
        for r in range(3):
            for i in range(7):
                gi = int(grp[i] if grp.ndim == 1 else grp[r, i])
                want[r, gi] += w[r, i] * x[i]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # a bool mask counts as 0/1, and no values means plain weight sums
    assert group_sums(w, fixed, 3, fixed == 2)[:, [0, 1]].abs().sum() == 0
    torch.testing.assert_close(group_sums(w, fixed, 3).sum(dim=1), w.sum(dim=1))


def test_tie_groups_by_hand() -> None:
    group, n = tie_groups(torch.tensor([0.3, 0.1, 0.3, 0.9]))
    assert n == 3 and group.tolist() == [1, 0, 1, 2]
    group, _ = tie_groups(torch.tensor([0.3, 0.1, 0.3, 0.9]), descending=True)
    assert group.tolist() == [1, 2, 1, 0]


def test_auroc_from_sums_matches_sklearn_with_ties_and_counts() -> None:
    rng = np.random.default_rng(3)
    scores = np.round(rng.random(60), 1)  # many ties
    y = rng.integers(0, 2, 60)
    counts = rng.integers(0, 3, 60)
    w = torch.tensor(np.stack([np.ones(60), counts]), dtype=torch.float64)
    pos, neg = binary_roc_sums(torch.tensor(scores), torch.tensor(y == 1), w)
    got = auroc_from_sums(pos, neg)
    assert got[0].item() == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
    assert got[1].item() == pytest.approx(roc_auc_score(np.repeat(y, counts), np.repeat(scores, counts)), abs=1e-12)
    # one class only: undefined
    pos, neg = binary_roc_sums(torch.tensor(scores), torch.ones(60, dtype=torch.bool), w)
    assert torch.isnan(auroc_from_sums(pos, neg)).all()


def test_negative_log_likelihood_matches_sklearn() -> None:
    rng = np.random.default_rng(4)
    p = rng.dirichlet(np.ones(3), 40)
    y = rng.integers(0, 3, 40)
    ones = torch.ones(1, 40, dtype=torch.float64)
    got = negative_log_likelihood(torch.tensor(p), torch.tensor(y), ones, "multiclass")
    assert got.item() == pytest.approx(log_loss(y, p, labels=[0, 1, 2]), rel=1e-12)
    pm = rng.random((40, 2))
    ym = rng.integers(0, 2, (40, 2))
    got = negative_log_likelihood(torch.tensor(pm), torch.tensor(ym), ones, "multilabel")
    want = log_loss(ym[:, 0], pm[:, 0]) + log_loss(ym[:, 1], pm[:, 1])  # summed over labels
    assert got.item() == pytest.approx(want, rel=1e-12)
    assert torch.isnan(negative_log_likelihood(torch.tensor(p), torch.tensor(y), torch.zeros(1, 40, dtype=torch.float64), "multiclass")).all()


def test_class_names() -> None:
    assert class_names(MetricContext("binary", ("neg", "pos")), 2) == ("neg", "pos")
    assert class_names(MetricContext("multiclass", ()), 3) == ("0", "1", "2")


def test_one_line() -> None:
    assert one_line("a\n  b\tc ") == "a b c"
    cut = one_line("x" * 500, 10)
    assert cut == "x" * 9 + "…" and len(cut) == 10
    assert one_line(ValueError("bad\nvalue")) == "bad value"


def test_hashing_against_hashlib(tmp_path: Path) -> None:
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"hello" * 1000)
    b.write_bytes(b"")
    assert sha256_file(a, chunk=7) == hashlib.sha256(b"hello" * 1000).hexdigest()
    want = hashlib.sha256(b"pre" + b"a.bin\0" + b"hello" * 1000 + b"b.bin\0").hexdigest()
    assert sha256_files([a, b], extra=b"pre", chunk=7) == want
    assert sha256_files([b, a], extra=b"pre") != want  # the order is part of the hash
