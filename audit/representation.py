"""Representation robustness: how far a perturbation moves a model's embeddings from the clean ones.

For every perturbed scenario the audit holds one embedding per sample for the clean input
(``clean`` ``[N, D]``) and one for the perturbed input (``shifted`` ``[N, D]``), in the same
sample order. Three measures compare them:

``cosine``
    The median over samples of the cosine similarity between a sample's perturbed and clean
    embedding, ``cos_i = <c_i, s_i> / (||c_i|| ||s_i||)``. Per sample, so it sees how far each
    embedding turns, but blind to a common rotation of the whole embedding space.
``cka``
    Linear centred kernel alignment between the clean and the perturbed embedding sets
    (Kornblith, Norouzi, Lee & Hinton, "Similarity of Neural Network Representations Revisited",
    ICML 2019). It compares the two sets' centred Gram matrices, so it is 1 for sets equal up to
    a translation, an orthogonal transform and an isotropic scaling, and it sees changes of
    the *geometry* of the set (which samples are close to which) rather than of single vectors.
``knn_consistency``
    The fraction of samples whose k-nearest-neighbour class vote is the same for the perturbed
    as for the clean embedding. Neighbours are found by cosine similarity among labelled
    reference embeddings, as in the k-NN evaluation of self-supervised features (DINO: Caron
    et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021), the usual
    probe of what a foundation model's embedding space encodes about the classes.

Each measure is reported with a percentile-bootstrap interval over the audit's weight matrix
``W`` ``[1 + R, N]`` (:func:`medaudit.bootstrap.bootstrap_weights`: row 0 ones, rows ``1..R``
multinomial counts). The weighted forms below are built so that, for integer count weights, a
row's value EQUALS the statistic computed on the data resampled by those counts (each sample
repeated as often as its count): the weighted median is ``numpy.median`` of the repeated values,
the weighted CKA the CKA of the repeated embedding sets, the weighted consistency the mean of
the repeated indicators. Everything is computed in float64 on the device of the inputs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .bootstrap import intervals
from .weighted import safe_div

__all__ = [
    "DEFINITIONS",
    "REPRESENTATION_MEASURES",
    "cosine_to_clean",
    "knn_consistency",
    "knn_votes",
    "linear_cka",
    "representation_measures",
    "weighted_median",
]

REPRESENTATION_MEASURES = ("cosine", "cka", "knn_consistency")

DEFINITIONS: dict[str, str] = {
    "cosine": "median over samples of the cosine similarity between a sample's perturbed and clean embedding",
    "cka": ("linear CKA (Kornblith et al. 2019) between the clean and the perturbed embeddings of the same "
            "samples: 1 when the two sets differ only by a translation, rotation or isotropic scaling"),
    "knn_consistency": ("fraction of samples whose k-nearest-neighbour class vote (cosine similarity to labelled "
                        "reference embeddings) is the same for the perturbed as for the clean embedding"),
}

_NAN = float("nan")
# Float64 elements of the [rows, N] and [N, block] temporaries alive at once (512 MiB): bounds
# the memory of the Gram-form CKA and of the k-NN similarity blocks whatever N and R are.
_CHUNK_ELEMENTS = 1 << 26
# Queries whose similarities to the reference are computed at once (fewer when the reference is
# so large that 4096 rows of similarities would exceed _CHUNK_ELEMENTS).
_QUERY_BLOCK = 4096
# A set counts as having zero variance when HSIC(K, K) <= _DEGENERATE * (sum_i w_i ||x_i||^2)^2,
# x centred by its unweighted mean (a set whose rows are all equal is centred to exact zeros).
# The Gram form subtracts terms of the size of that bound, so a resample that has no variance
# (it drew a single sample, or only copies of one embedding) leaves a rounding residue of a few
# float64 epsilons of it instead of an exact 0; a set with real variance has a ratio of at least
# about 1/D (isotropic in D dimensions), far above this.
_DEGENERATE = 1e-10


def _float64_2d(name: str, t: Tensor) -> Tensor:
    if t.ndim != 2:
        raise ValueError(f"{name} must be [N, D], got shape {tuple(t.shape)}")
    return t.detach().to(torch.float64)


def cosine_to_clean(clean: Tensor, shifted: Tensor) -> Tensor:
    """Per-sample cosine similarity between the perturbed and the clean embedding.

    ``cos_i = sum_d c_id s_id / (||c_i||_2 ||s_i||_2)``.

    Parameters
    ----------
    clean, shifted : Tensor ``[N, D]``
        The clean and perturbed embeddings of the same samples, in the same order.

    Returns
    -------
    Tensor ``[N]`` float64
        In ``[-1, 1]``; NaN where either vector is all zeros (the angle is undefined, and a
        silent 0 or 1 would bias the median).
    """
    c, s = _float64_2d("clean", clean), _float64_2d("shifted", shifted).to(clean.device)
    if c.shape != s.shape:
        raise ValueError(f"clean and shifted embeddings differ in shape: {tuple(c.shape)} vs {tuple(s.shape)}")
    den = torch.linalg.vector_norm(c, dim=1) * torch.linalg.vector_norm(s, dim=1)
    return safe_div((c * s).sum(dim=1), den)


def weighted_median(values: Tensor, weights: Tensor) -> Tensor:
    """Median of ``values`` under each row of count weights.

    With integer counts ``w`` and total ``T = sum_i w_i``, the value is ``numpy.median`` of the
    data resampled by ``w`` (sample ``i`` repeated ``w_i`` times): with the values sorted and
    ``F_j`` the cumulative weight up to sorted position ``j``, the lower middle order statistic
    is the first value with ``F_j >= T/2`` and the upper one the first with ``F_j > T/2``;
    the median is their average. For odd ``T`` both are order statistic ``(T+1)/2``; for even
    ``T`` they are ``T/2`` and ``T/2 + 1``, as numpy averages. Non-integer weights get the same
    rule (a weighted median that splits the weight in halves).

    Parameters
    ----------
    values : Tensor ``[N]``
        NaN values are ignored: their weight is dropped.
    weights : Tensor ``[R, N]``
        Non-negative weights, e.g. a bootstrap weight matrix.

    Returns
    -------
    Tensor ``[R]`` float64
        NaN for a row with no weight on a non-NaN value.
    """
    if values.ndim != 1 or weights.ndim != 2 or weights.shape[1] != values.shape[0]:
        raise ValueError(f"values must be [N] and weights [R, N], got {tuple(values.shape)} and {tuple(weights.shape)}")
    v = values.detach().to(torch.float64)
    rows, n = weights.shape
    out = torch.full((rows,), _NAN, dtype=torch.float64, device=v.device)
    if n == 0 or rows == 0:
        return out
    nan = torch.isnan(v)
    # Sort once for every row; NaN sorts last and carries no weight, so it is never selected
    # (the selected positions are where the cumulative weight rises, i.e. have positive weight).
    order = torch.argsort(torch.where(nan, torch.full_like(v, math.inf), v))
    sorted_v = v[order]
    usable = (~nan)[order].to(torch.float64)
    chunk = max(1, _CHUNK_ELEMENTS // (4 * n))
    for start in range(0, rows, chunk):
        w = weights[start : start + chunk].detach().to(device=v.device, dtype=torch.float64)[:, order] * usable
        # cumsum of non-negative terms is non-decreasing in floating point too, as searchsorted needs
        cum = torch.cumsum(w, dim=1)
        total = cum[:, -1]
        half = (total / 2).unsqueeze(1)
        lo = torch.searchsorted(cum, half, side="left").clamp_(max=n - 1).squeeze(1)
        hi = torch.searchsorted(cum, half, side="right").clamp_(max=n - 1).squeeze(1)
        med = (sorted_v[lo] + sorted_v[hi]) / 2
        out[start : start + chunk] = torch.where(total > 0, med, torch.full_like(med, _NAN))
    return out


def _centred(t: Tensor) -> Tensor:
    """``t`` minus its unweighted mean; exact zeros for a set whose rows are all equal.

    The computed mean of equal rows can miss them by an ulp, which would leave a constant
    residue that looks like a (rank-one) spread of its own size to every relative test.
    """
    if bool((t == t[:1]).all()):
        return torch.zeros_like(t)
    return t - t.mean(dim=0)


def _cka_ratio(kl: Tensor, kk: Tensor, ll: Tensor, sx: Tensor, sy: Tensor) -> Tensor:
    """``kl / sqrt(kk ll)``, NaN where a set has (numerically) zero variance; see _DEGENERATE."""
    degenerate = (kk <= _DEGENERATE * sx * sx) | (ll <= _DEGENERATE * sy * sy) | torch.isnan(kk * ll)
    den = torch.sqrt(torch.where(degenerate, torch.ones_like(kk), kk * ll))
    return torch.where(degenerate, torch.full_like(kl, _NAN), kl / den)


def _cka_gram_rows(x: Tensor, y: Tensor, weights: Tensor) -> Tensor:
    """Weighted linear CKA for every row of ``weights``, Gram form, bounded memory.

    Every term of the weighted HSIC (see :func:`linear_cka`) is a sum over a sample index ``i``
    of ``w_i`` times ``(M w)_i`` for ``M`` one of ``K, L, K∘L, K∘K, L∘L`` (K, L symmetric), so
    the sums split over blocks of columns of the Gram matrices: only an ``[N, block]`` slice of
    each is ever formed, and each slice once, whatever the number of rows.
    """
    n = x.shape[0]
    rows = weights.shape[0]
    sq_x, sq_y = (x * x).sum(dim=1), (y * y).sum(dim=1)
    row_chunk = min(rows, max(1, (_CHUNK_ELEMENTS // 4) // n))
    block = min(n, max(1, (_CHUNK_ELEMENTS // 2) // (8 * n + 8 * row_chunk)))
    zeros = [torch.zeros(rows, dtype=torch.float64, device=x.device) for _ in range(8)]
    kl, kk, ll, kw_lw, kw_kw, lw_lw, wkw, wlw = zeros
    for c0 in range(0, n, block):
        kb = x @ x[c0 : c0 + block].T  # K[:, block]
        lb = y @ y[c0 : c0 + block].T
        width = kb.shape[1]
        # one matmul per row chunk gives (M w)_block for all five M
        gram = torch.cat([kb, lb, kb * lb, kb * kb, lb * lb], dim=1)
        del kb, lb
        for r0 in range(0, rows, row_chunk):
            w = weights[r0 : r0 + row_chunk].to(torch.float64)
            prod = w @ gram
            kw, lw, klw, kkw, llw = prod.split(width, dim=1)
            wb = w[:, c0 : c0 + block]
            sl = slice(r0, r0 + row_chunk)
            kl[sl] += (wb * klw).sum(dim=1)
            kk[sl] += (wb * kkw).sum(dim=1)
            ll[sl] += (wb * llw).sum(dim=1)
            wkw_b, wlw_b = wb * kw, wb * lw
            kw_lw[sl] += (wkw_b * lw).sum(dim=1)
            kw_kw[sl] += (wkw_b * kw).sum(dim=1)
            lw_lw[sl] += (wlw_b * lw).sum(dim=1)
            wkw[sl] += wkw_b.sum(dim=1)
            wlw[sl] += wlw_b.sum(dim=1)
    total = torch.empty(rows, dtype=torch.float64, device=x.device)
    sx = torch.empty_like(total)
    sy = torch.empty_like(total)
    for r0 in range(0, rows, row_chunk):
        w = weights[r0 : r0 + row_chunk].to(torch.float64)
        total[r0 : r0 + row_chunk] = w.sum(dim=1)
        sx[r0 : r0 + row_chunk] = w @ sq_x  # sum_i w_i K_ii: the scale of the zero-variance test
        sy[r0 : r0 + row_chunk] = w @ sq_y
    has = total > 0
    t = torch.where(has, total, torch.ones_like(total))
    hsic_kl = kl - 2 / t * kw_lw + wkw * wlw / (t * t)
    hsic_kk = kk - 2 / t * kw_kw + wkw * wkw / (t * t)
    hsic_ll = ll - 2 / t * lw_lw + wlw * wlw / (t * t)
    cka = _cka_ratio(hsic_kl, hsic_kk, hsic_ll, sx, sy)
    return torch.where(has, cka, torch.full_like(cka, _NAN))


def linear_cka(x: Tensor, y: Tensor, weights: Tensor | None = None) -> Tensor:
    """Linear CKA between two embedding sets of the same samples (Kornblith et al., ICML 2019).

    ``CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` with the linear kernels ``K = x xᵀ``,
    ``L = y yᵀ`` and ``HSIC(K, L) = tr(K H L H)`` up to a factor that cancels, ``H = I - 11ᵀ/n``
    the centring matrix.

    Weighted (one value per row ``w`` of ``weights``), with ``n = sum_i w_i``,
    ``a = K w / n`` and ``c = wᵀ K w / n²``, the weighted-centred kernel is
    ``Kc_ij = K_ij - a_i - a_j + c`` (so ``sum_j w_j Kc_ij = 0``), and::

        HSIC_w(K, L) = sum_ij w_i w_j Kc_ij Lc_ij
                     = wᵀ(K∘L)w - (2/n) sum_i w_i (Kw)_i (Lw)_i + (wᵀKw)(wᵀLw) / n².

    For integer counts this is exactly ``tr(K' H L' H)`` of the resampled data (rows repeated
    ``w_i`` times), so a row's CKA equals the CKA of the resampled sets.

    Parameters
    ----------
    x : Tensor ``[N, D1]``
    y : Tensor ``[N, D2]``
        Embeddings of the same ``N`` samples, in the same order.
    weights : Tensor ``[R, N]``, optional
        Non-negative (count) weights, e.g. a bootstrap weight matrix.

    Returns
    -------
    Tensor float64
        0-dim without ``weights``, ``[R]`` with them. NaN where a set has zero variance
        (``HSIC(K, K) = 0``: within rounding, see ``_DEGENERATE``) or a row has no weight.

    Notes
    -----
    Both sets are first centred by their unweighted mean: CKA with weighted centring is
    unchanged by translating a set, and it keeps the Gram entries (and so the cancellation in
    the formula above) of the size of the variance rather than of the squared mean.
    Without weights and with ``D1, D2`` small against ``N`` the equivalent feature-space form
    ``HSIC = ||x̃ᵀ ỹ||_F²`` (centred ``x̃, ỹ``) is used: ``O(N D1 D2)`` instead of ``O(N² (D1 + D2))``.
    Weighted rows use the Gram form, computed on ``[N, block]`` slices of the Gram matrices and
    chunks of rows so that about ``2**26`` float64 elements are alive at once.
    """
    xs, ys = _float64_2d("x", x), _float64_2d("y", y).to(x.device)
    if xs.shape[0] != ys.shape[0]:
        raise ValueError(f"x and y must hold the same samples, got {xs.shape[0]} and {ys.shape[0]} rows")
    n, d1 = xs.shape
    d2 = ys.shape[1]
    if weights is not None:
        if weights.ndim != 2 or weights.shape[1] != n:
            raise ValueError(f"weights must be [R, {n}], got {tuple(weights.shape)}")
        w = weights.detach().to(xs.device)
        if n == 0:
            return torch.full((w.shape[0],), _NAN, dtype=torch.float64, device=xs.device)
    if n == 0:
        return torch.tensor(_NAN, dtype=torch.float64, device=xs.device)
    xs, ys = _centred(xs), _centred(ys)
    if weights is None:
        feature_cost = d1 * d2 + d1 * d1 + d2 * d2
        if feature_cost <= n * (d1 + d2) and feature_cost <= _CHUNK_ELEMENTS:
            # exact centring here: HSIC(K, L) = ||x̃ᵀỹ||_F², HSIC(K, K) = ||x̃ᵀx̃||_F²
            kl = torch.linalg.matrix_norm(xs.T @ ys) ** 2
            kk = torch.linalg.matrix_norm(xs.T @ xs) ** 2
            ll = torch.linalg.matrix_norm(ys.T @ ys) ** 2
            return _cka_ratio(kl, kk, ll, (xs * xs).sum(), (ys * ys).sum())
        return _cka_gram_rows(xs, ys, torch.ones(1, n, dtype=torch.float64, device=xs.device))[0]
    return _cka_gram_rows(xs, ys, w)


def _unit_rows(t: Tensor) -> Tensor:
    # an all-zero row stays zero (similarity 0 to everything), as scikit-learn's cosine metric does
    norm = torch.linalg.vector_norm(t, dim=1, keepdim=True)
    return t / torch.where(norm > 0, norm, torch.ones_like(norm))


def knn_votes(reference: Tensor, reference_labels: Tensor, queries: Tensor, k: int, n_classes: int,
              exclude: Tensor | None = None) -> Tensor:
    """The class each query's ``k`` nearest reference embeddings vote for.

    Similarity is cosine, ``<q, r> / (||q|| ||r||)`` (rows L2-normalised, the usual choice for
    foundation-model embeddings, as in DINO's k-NN evaluation); the ``k`` most similar
    reference rows each cast one vote for their label; the majority wins, ties going to the
    lowest class index (as scikit-learn's ``KNeighborsClassifier``).

    Parameters
    ----------
    reference : Tensor ``[M, D]``
        Labelled reference embeddings.
    reference_labels : Tensor ``[M]`` integer in ``[0, n_classes)``
    queries : Tensor ``[Nq, D]``
    k : int
        Neighbours per query, capped at the number of usable reference rows (``M``, or
        ``M - 1`` for a query with an excluded row).
    n_classes : int
    exclude : Tensor ``[Nq]`` int64, optional
        A reference row index each query must not count among its neighbours (-1 for none):
        when the reference is the clean audit data itself a sample must never be its own
        neighbour, which would make every clean vote its own label.

    Returns
    -------
    Tensor ``[Nq]`` int64
        The voted class of each query.

    Notes
    -----
    Queries are processed in blocks (at most 4096, fewer for a large reference) so that the
    ``[block, M]`` similarity matrix stays bounded. All-zero rows have similarity 0 to
    everything; exactly tied similarities are broken arbitrarily.
    """
    ref = _unit_rows(_float64_2d("reference", reference))
    device = ref.device
    q_all = _float64_2d("queries", queries).to(device)
    m, nq = ref.shape[0], q_all.shape[0]
    if q_all.shape[1] != ref.shape[1]:
        raise ValueError(f"queries have {q_all.shape[1]} dimensions, the reference {ref.shape[1]}")
    if reference_labels.shape != (m,):
        raise ValueError(f"reference_labels must be [{m}], got {tuple(reference_labels.shape)}")
    if k < 1 or n_classes < 1:
        raise ValueError(f"k and n_classes must be positive, got {k} and {n_classes}")
    labels = reference_labels.detach().to(device=device, dtype=torch.int64)
    if m and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        raise ValueError(f"reference_labels must lie in [0, {n_classes})")
    if exclude is not None:
        if exclude.shape != (nq,):
            raise ValueError(f"exclude must be [{nq}], got {tuple(exclude.shape)}")
        exclude = exclude.detach().to(device=device, dtype=torch.int64)
        if nq and int(exclude.max()) >= m:
            raise ValueError(f"exclude holds a row index >= the {m} reference rows")
    if nq and (m == 0 or (m == 1 and exclude is not None and bool((exclude >= 0).any()))):
        raise ValueError("a query has no usable reference row to vote")
    out = torch.empty(nq, dtype=torch.int64, device=device)
    if nq == 0:
        return out
    k_eff = min(k, m)
    block = max(1, min(_QUERY_BLOCK, _CHUNK_ELEMENTS // m))
    for s in range(0, nq, block):
        sims = _unit_rows(q_all[s : s + block]) @ ref.T
        if exclude is not None:
            # the excluded row gets -inf: never among the top k unless k exceeds the usable
            # rows, and then its vote is masked below (k capped per query)
            ex = exclude[s : s + block].unsqueeze(1)
            col = ex.clamp(min=0)
            kept = sims.gather(1, col)
            sims.scatter_(1, col, torch.where(ex >= 0, torch.full_like(kept, -math.inf), kept))
        top, idx = sims.topk(k_eff, dim=1)
        valid = (top > -math.inf).to(torch.float64)
        counts = torch.zeros(sims.shape[0], n_classes, dtype=torch.float64, device=device)
        counts.scatter_add_(1, labels[idx], valid)
        out[s : s + block] = counts.argmax(dim=1)  # first maximum: ties to the lowest class
    return out


def knn_consistency(reference: Tensor, reference_labels: Tensor, clean: Tensor, shifted: Tensor, k: int,
                    n_classes: int, self_reference: bool) -> Tensor:
    """Per sample, whether the k-NN vote of its perturbed embedding equals that of its clean one.

    ``c_i = 1[vote(clean_i) == vote(shifted_i)]`` with :func:`knn_votes`. Agreement rather
    than accuracy: it needs no label of the audited sample, and it measures whether the
    perturbation moves the embedding across a class region of the reference.

    Parameters
    ----------
    reference : Tensor ``[M, D]``
    reference_labels : Tensor ``[M]`` int
    clean, shifted : Tensor ``[N, D]``
        Clean and perturbed embeddings of the same samples.
    k, n_classes : int
        See :func:`knn_votes`.
    self_reference : bool
        True when the reference IS the clean audit set (``M = N``, same rows, same order):
        row ``i`` is then excluded from the neighbours of both of sample ``i``'s queries (its
        clean embedding would otherwise be its own nearest neighbour, and the perturbed one's
        nearest too for a small perturbation).

    Returns
    -------
    Tensor ``[N]`` float64 of 0/1.
    """
    if clean.shape != shifted.shape:
        raise ValueError(f"clean and shifted embeddings differ in shape: "
                         f"{tuple(clean.shape)} vs {tuple(shifted.shape)}")
    n = clean.shape[0]
    exclude = None
    if self_reference:
        if reference.shape[0] != n:
            raise ValueError(f"self_reference needs the reference to be the {n} clean rows, got {reference.shape[0]}")
        own = torch.arange(n, device=reference.device)
        exclude = torch.cat([own, own])
    # one call for both query sets: the reference is normalised once
    votes = knn_votes(reference, reference_labels, torch.cat([clean, shifted.to(clean.device)]), k, n_classes,
                      exclude)
    return (votes[:n] == votes[n:]).to(torch.float64)


def representation_measures(clean: Tensor, shifted: Tensor, weights: Tensor, confidence: float, *,
                            reference: Tensor | None, reference_labels: Tensor | None, k: int, n_classes: int,
                            self_reference: bool) -> dict[str, dict[str, float | None]]:
    """The three representation measures of one perturbed scenario, with bootstrap intervals.

    Per row ``w`` of ``weights``:

    - ``cosine``: :func:`weighted_median` of :func:`cosine_to_clean` (NaN cosines ignored);
    - ``cka``: :func:`linear_cka` of ``clean`` and ``shifted`` under ``w``;
    - ``knn_consistency``: ``sum_i w_i c_i / sum_i w_i`` with ``c`` from :func:`knn_consistency`.

    Row 0 (ones) gives the value, rows ``1..R`` the percentile interval
    (:func:`medaudit.bootstrap.intervals`).

    Parameters
    ----------
    clean, shifted : Tensor ``[N, D]``
    weights : Tensor ``[1 + R, N]``
        The audit's bootstrap weight matrix (:func:`medaudit.bootstrap.bootstrap_weights`).
    confidence : float
        Interval coverage, e.g. 0.95.
    reference, reference_labels, k, n_classes, self_reference
        See :func:`knn_consistency`; ``reference`` None leaves ``knn_consistency`` out (a task
        without one class per sample has no vote to compare).

    Returns
    -------
    dict
        ``{name: {"value", "ci_low", "ci_high"}}`` for each of :data:`REPRESENTATION_MEASURES`
        (``None`` where undefined).
    """
    if weights.ndim != 2 or weights.shape[1] != clean.shape[0]:
        raise ValueError(f"weights must be [1 + R, {clean.shape[0]}], got {tuple(weights.shape)}")
    w = weights.detach().to(clean.device)
    cos = cosine_to_clean(clean, shifted)
    rows = {"cosine": weighted_median(cos, w), "cka": linear_cka(clean, shifted, w)}
    if reference is not None and reference_labels is not None:
        agree = knn_consistency(reference, reference_labels, clean, shifted, k, n_classes, self_reference)
        w64 = w.to(torch.float64)
        rows["knn_consistency"] = safe_div(w64 @ agree, w64.sum(dim=1))
    return intervals(rows, confidence)
