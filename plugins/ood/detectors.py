"""Built-in OOD / shift detectors: output-based (msp, max_logit, energy, entropy) and
feature-based (mahalanobis, knn, spectral).

Every score is oriented **higher = more shifted**. Output-based detectors keep the raw model
outputs as their embedding (``[B, K]``, ``K`` ≤ a few hundred) and do all the work in
:meth:`score`, so the same embedding serves logit and probability outputs. Binary models that
emit one value per sample (``[B]`` or ``[B, 1]``) are treated as two-class logits ``[0, z]``
(softmax of ``[0, z]`` is ``[1 − σ(z), σ(z)]``, the model's own probabilities), or, for
probability outputs, as ``[1 − p, p]``.

Feature-based detectors reduce the configured layer's output on the device inside the forward
loop (global average pooling, or singular values for ``spectral``), fit on in-distribution
embeddings and score others; fitting and scoring run in float64 on the embeddings' device.
See docs/ood.md for formulas, conventions and citations.
"""

from __future__ import annotations

import math
from abc import abstractmethod
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import ClassVar, Literal

import torch
from torch import Tensor

from medaudit.detector import Detector
from medaudit.features import pool
from medaudit.task import OutputKind

# Smallest normalised singular value kept before the log: a rank-deficient map has exact zeros.
_SPECTRAL_FLOOR = 1e-12


# ---------------------------------------------------------------------------------------------
# Output-based detectors
# ---------------------------------------------------------------------------------------------


def two_class(outputs: Tensor, kind: OutputKind = "logits") -> Tensor:
    """``[N, K]`` class logits (or probabilities), expanding one-value binary outputs to two classes."""
    if outputs.ndim == 1:
        outputs = outputs[:, None]
    if outputs.shape[1] == 1:
        z = outputs[:, 0]
        return torch.stack([1 - z, z], 1) if kind == "probabilities" else torch.stack([torch.zeros_like(z), z], 1)
    return outputs


class OutputDetector(Detector):
    """Base of detectors computed from the model outputs; no fitting.

    ``output_kind`` says whether the outputs are logits (default) or probabilities; the audit
    sets it from the detected output kind. Detectors with ``logits_only`` are undefined for
    probability outputs (log-probabilities are logits only up to a per-sample constant).
    """

    needs: ClassVar[Literal["logits", "features"]] = "logits"
    logits_only: ClassVar[bool] = False

    def __init__(self) -> None:
        self.output_kind: OutputKind = "logits"
        #: The outputs are per-voxel class maps ``[B, K, *spatial]`` (a segmentation task): the
        #: embedding is then the image's mean voxel score ``[B, 1]``, and the score that mean.
        self.voxelwise = False

    def embed(self, logits: Tensor, features: Tensor | None) -> Tensor:
        if self.voxelwise:
            # [B, K, V]: score_rows reduces over axis 1, the classes, whatever follows it, so the
            # map is scored in place — a channels-last copy of millions of voxels cost more than the scores
            return self.score_rows(logits.flatten(2)).mean(dim=1, keepdim=True, dtype=torch.float64)
        return logits[:, None] if logits.ndim == 1 else logits

    def score(self, embeddings: Tensor) -> Tensor:
        return embeddings[:, 0].double() if self.voxelwise else self.score_rows(embeddings)

    @abstractmethod
    def score_rows(self, embeddings: Tensor) -> Tensor:
        """Scores ``[N]`` of rows of class scores ``[N, K]`` (samples); reducing over axis 1 only, so
        that a map's voxels ``[B, K, V]`` give ``[B, V]``."""

    def precise(self, embeddings: Tensor) -> Tensor:
        """The embeddings in the precision their scores are computed in: float64 for rows of
        per-sample outputs; a voxel map's own dtype, its millions of per-voxel scores then averaged
        per image in float64 (:meth:`embed`) — float32 rounding of each voxel's score is far below
        what a mean over a map can resolve, and float64 passes over the map cost as much as its
        forward pass."""
        return embeddings if self.voxelwise else embeddings.double()

    def probs(self, embeddings: Tensor) -> Tensor:
        x = two_class(self.precise(embeddings), self.output_kind)
        return x if self.output_kind == "probabilities" else torch.softmax(x, dim=1)


class MSP(OutputDetector):
    """Maximum softmax probability baseline: ``score = −max_k p_k`` (Hendrycks & Gimpel, ICLR 2017)."""

    name = "msp"
    summary = "negative maximum softmax probability"
    citation = "Hendrycks & Gimpel, A Baseline for Detecting Misclassified and Out-of-Distribution Examples, ICLR 2017"

    def score_rows(self, embeddings: Tensor) -> Tensor:
        return -self.probs(embeddings).max(dim=1).values


class MaxLogit(OutputDetector):
    """Maximum logit: ``score = −max_k z_k`` (Hendrycks et al., ICML 2022)."""

    name = "max_logit"
    logits_only = True
    summary = "negative maximum logit"
    citation = "Hendrycks et al., Scaling Out-of-Distribution Detection for Real-World Settings, ICML 2022"

    def score_rows(self, embeddings: Tensor) -> Tensor:
        return -two_class(self.precise(embeddings)).max(dim=1).values


class Energy(OutputDetector):
    """Free energy: ``score = E(x) = −T · logsumexp_k(z_k / T)`` (Liu et al., NeurIPS 2020).

    In-distribution inputs have lower (more negative) energy, so the energy itself is the score.
    """

    name = "energy"
    logits_only = True
    summary = "free energy −T·logsumexp(z/T)"
    citation = "Liu, Wang, Owens & Li, Energy-based Out-of-distribution Detection, NeurIPS 2020"

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"energy temperature must be positive and finite, got {temperature}")
        self.temperature = float(temperature)

    def score_rows(self, embeddings: Tensor) -> Tensor:
        t = self.temperature
        return -t * torch.logsumexp(two_class(self.precise(embeddings)) / t, dim=1)


class Entropy(OutputDetector):
    """Predictive entropy: ``score = −Σ_k p_k log p_k`` (nats; ``0 log 0 = 0``)."""

    name = "entropy"
    summary = "entropy of the predicted class distribution"
    citation = "Shannon entropy of the softmax output; e.g. Hendrycks et al., ICLR 2019 (outlier exposure)"

    def score_rows(self, embeddings: Tensor) -> Tensor:
        p = self.probs(embeddings)
        return -torch.special.xlogy(p, p).sum(dim=1)


# ---------------------------------------------------------------------------------------------
# Shared numerics
# ---------------------------------------------------------------------------------------------


def ledoit_wolf(x: Tensor) -> tuple[Tensor, float]:
    """Ledoit–Wolf shrunk covariance of already-centred rows ``x [n, p]``.

    ``Σ̂ = (1 − δ) S + δ μ I`` with ``S = xᵀx / n``, ``μ = tr(S) / p`` and the shrinkage
    ``δ = min(β, d) / d``, ``d = ‖S − μI‖²_F / p``,
    ``β = (Σ_i ‖x_i x_iᵀ − S‖²_F) / (n² p)`` (Ledoit & Wolf, J. Multivariate Anal. 2004), the
    estimator of ``sklearn.covariance.ledoit_wolf(x, assume_centered=True)``.

    Returns ``(Σ̂ [p, p], δ)``.
    """
    n, p = x.shape
    x = x.double()
    s = x.T @ x / n
    mu = torch.trace(s) / p
    x2 = x * x
    # ‖S − μI‖²_F and Σ_i ‖x_i x_iᵀ − S‖²_F without forming n p×p matrices. The p×p sums go row by
    # row: torch splits one sum over more than 32768 values between threads, so its last bits
    # would depend on the thread count (p > 181); each row's sum is one thread's.
    ss = (s * s).sum(dim=1).sum()
    d = (ss - 2 * mu * torch.trace(s) + p * mu * mu) / p
    beta = ((x2.T @ x2).sum(dim=1).sum() / n - ss) / (n * p)
    beta = torch.minimum(beta, d)
    shrink = 0.0 if float(d) == 0 else float(beta / d)
    cov = (1 - shrink) * s + shrink * mu * torch.eye(p, dtype=s.dtype, device=s.device)
    return cov, shrink


def _whitener(cov: Tensor) -> Tensor:
    """``L⁻¹`` for the lower Cholesky factor ``L`` of ``cov`` (jittered if it is numerically
    singular): ``‖L⁻¹(x − μ)‖²`` is the squared Mahalanobis distance.

    Factor and inverse are computed on one thread. On some CPUs (seen on an AMD EPYC with MKL) a
    triangular solve gives different last bits with 1 and 2 threads, which made the detectors'
    scores, and so results.json, depend on ``audit.threads``; the whitened vectors are then
    matrix products, whose bits do not depend on the thread count."""
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    jitter = 0.0
    scale = float(torch.diagonal(cov).mean().abs()) or 1.0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(8):
            chol, info = torch.linalg.cholesky_ex(cov + jitter * scale * eye)
            if int(info) == 0:
                return torch.linalg.solve_triangular(chol, eye, upper=False)
            jitter = 1e-10 if jitter == 0 else jitter * 100
    finally:
        torch.set_num_threads(threads)
    raise ValueError("covariance is not positive definite even after jitter; are the features constant?")


def _sq_mahalanobis(x: Tensor, means: Tensor, whitener: Tensor) -> Tensor:
    """``[N, C]`` squared distances ``(x − μ_c)ᵀ Σ⁻¹ (x − μ_c)`` with ``Σ⁻¹ = WᵀW``, ``W`` from :func:`_whitener`."""
    return torch.cdist(x @ whitener.T, means @ whitener.T).pow(2)


def query_chunk(bank: Tensor, block: int | None = None) -> int:
    """Queries per chunk so that a ``[chunk, M]`` block against ``bank`` ``[M, D]`` has at most
    ``block`` entries: by default 2**21 (16 MiB in float64) on a CPU, where blocks that fit the
    caches were as fast as 8x larger ones, and 2**24 on an accelerator, where each block costs
    kernel launches; at most 4096 queries."""
    if block is None:
        block = 1 << 21 if bank.device.type == "cpu" else 1 << 24
    return max(1, min(4096, block // max(1, bank.shape[0])))


def kth_nn_distance(queries: Tensor, bank: Tensor, k: int, block: int | None = None) -> Tensor:
    """Euclidean distance from every query to its ``k``-th nearest row of ``bank``.

    Queries are taken in chunks whose distance block has at most ``block`` entries, so the
    memory stays bounded as the bank grows with the data set (with a fixed 4096-query chunk, a
    30,000-sample audit's cross-fitted bank of 15,000 made each block 0.5 GB). The default is
    2**21 entries (16 MiB in float64) on a CPU, where blocks that fit the caches were as fast as
    8x larger ones, and 2**24 on an accelerator, where each block costs kernel launches.

    Squared distances ``‖q‖² − 2 q·b + ‖b‖²`` are written into one block allocated per call (the
    expansion ``torch.cdist`` uses beyond 25 rows). A fresh block per chunk, with the small
    results allocated between them, fragmented the C heap: a 30,000-sample audit's detectors
    phase peaked at 1.5 GB, against 0.94 GB with one block per call. The ``k``-th smallest square
    gives the distance (the square root is monotone), clamped at zero against rounding.
    """
    n, m = queries.shape[0], bank.shape[0]
    out = bank.new_empty(n)
    if n == 0:
        return out
    queries = queries.to(bank.dtype)
    chunk = query_chunk(bank, block)
    bank_sq = bank.pow(2).sum(dim=1)
    buf = bank.new_empty((min(chunk, n), m))
    for s in range(0, n, chunk):
        q = queries[s : s + chunk]
        sq = buf[: q.shape[0]]
        torch.addmm(bank_sq, q, bank.T, alpha=-2.0, out=sq)
        sq += q.pow(2).sum(dim=1, keepdim=True)
        out[s : s + q.shape[0]] = sq.topk(k, dim=1, largest=False).values[:, -1].clamp_min(0).sqrt()
    return out


def _effective_k(k: int, n: int) -> int:
    # Sun et al. score training samples against the rest of the bank; n − 1 keeps k valid then too.
    return max(1, min(k, n - 1))


# ---------------------------------------------------------------------------------------------
# Feature-based detectors
# ---------------------------------------------------------------------------------------------


class Mahalanobis(Detector):
    """Class-conditional Gaussians with a shared covariance (Lee et al., NeurIPS 2018).

    Embedding: globally average-pooled features ``f``. Fit: class means ``μ_c`` and the
    Ledoit–Wolf-shrunk covariance ``Σ`` of the class-centred embeddings (``f_i − μ_{y_i}``, the
    paper's tied covariance with 1/N normalisation, shrunk so that ``D > N`` still works).
    Score: ``min_c (f − μ_c)ᵀ Σ⁻¹ (f − μ_c)`` (the negative of the paper's confidence score).
    Not implemented: input pre-processing and the layer ensemble of the paper.
    Multilabel labels (``[N, K]``) fit a single Gaussian.
    """

    name = "mahalanobis"
    needs = "features"
    summary = "min class-conditional Mahalanobis distance of pooled features (tied, Ledoit–Wolf covariance)"
    citation = "Lee, Lee, Lee & Shin, A Simple Unified Framework for Detecting Out-of-Distribution Samples and Adversarial Attacks, NeurIPS 2018"

    def __init__(self) -> None:
        self.means: Tensor | None = None
        self.whitener: Tensor | None = None
        self.shrinkage: float | None = None

    def embed(self, logits: Tensor, features: Tensor | None) -> Tensor:
        if features is None:
            raise ValueError("mahalanobis needs features")
        return pool(features)

    def fit(self, embeddings: Tensor, labels: Tensor) -> None:
        x = embeddings.double()
        if x.shape[0] < 2:
            raise ValueError(f"mahalanobis needs at least 2 reference samples, got {x.shape[0]}")
        y = labels.to(x.device).long() if labels.ndim == 1 else torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        classes = torch.unique(y)
        means = torch.stack([x[y == c].mean(0) for c in classes])
        centred = x - means[torch.searchsorted(classes, y)]
        cov, self.shrinkage = ledoit_wolf(centred)
        self.means, self.whitener = means, _whitener(cov)

    def score(self, embeddings: Tensor) -> Tensor:
        if self.means is None or self.whitener is None:
            raise RuntimeError("mahalanobis: fit() must be called before score()")
        x = embeddings.double().to(self.means.device)
        return _sq_mahalanobis(x, self.means, self.whitener).min(dim=1).values


class MahalanobisEnsemble(Detector):
    """Mahalanobis scores of several layers, combined (Lee et al.'s layer ensemble, NeurIPS 2018).

    Embedding: the globally average-pooled output of every stage of ``model.feature_layers``,
    concatenated. Fit: a :class:`Mahalanobis` detector per stage (class means, tied Ledoit–Wolf
    covariance), and the mean ``m_l`` and standard deviation ``s_l`` of each stage's scores on the
    fitting data. Score: ``Σ_l (d_l(f) − m_l) / s_l``, each stage's min class-conditional
    distance standardised on the in-distribution data. The paper weights the layers by a
    logistic regression fitted on held-out OOD (or adversarial) samples, which an audit does not
    have; equal weights after standardisation are the assumption-free choice. Not implemented:
    the paper's input pre-processing. The fitting data's own scores are in-sample (a little
    smaller than new inputs' in high dimensions); the same shift applies to every input scored.
    """

    name = "mahalanobis_ensemble"
    needs = "stages"
    summary = "sum of the stages' standardised min class-conditional Mahalanobis distances of pooled features"
    citation = ("Lee, Lee, Lee & Shin, A Simple Unified Framework for Detecting Out-of-Distribution Samples and "
                "Adversarial Attacks, NeurIPS 2018 (feature ensemble)")

    def __init__(self) -> None:
        self.layers: list[Mahalanobis] = []
        self.centre: Tensor | None = None
        self.scale: Tensor | None = None

    def embed(self, logits: Tensor, features: Tensor | list[Tensor] | None) -> Tensor:
        if features is None:
            raise ValueError("mahalanobis_ensemble needs features")
        return torch.cat([pool(f) for f in (features if isinstance(features, list) else [features])], dim=1)

    def _split(self, embeddings: Tensor) -> tuple[Tensor, ...]:
        dims = [shape[0] for _, shape in self.stages]
        if sum(dims) != embeddings.shape[1]:
            raise ValueError(f"mahalanobis_ensemble: embeddings have {embeddings.shape[1]} values per sample, the "
                             f"stages {[name for name, _ in self.stages]} give {sum(dims)} channels in all")
        return embeddings.split(dims, dim=1)

    def fit(self, embeddings: Tensor, labels: Tensor) -> None:
        self.layers = []
        per_layer = []
        for part in self._split(embeddings):
            det = Mahalanobis()
            det.fit(part, labels)
            self.layers.append(det)
            per_layer.append(det.score(part))
        fitted = torch.stack(per_layer)  # [L, N]
        self.centre = fitted.mean(dim=1, keepdim=True)
        self.scale = fitted.std(dim=1, keepdim=True).clamp_min(torch.finfo(fitted.dtype).tiny)

    def score(self, embeddings: Tensor) -> Tensor:
        if self.centre is None or self.scale is None:
            raise RuntimeError("mahalanobis_ensemble: fit() must be called before score()")
        scores = torch.stack([det.score(part) for det, part in zip(self.layers, self._split(embeddings))])
        return ((scores - self.centre.to(scores.device)) / self.scale.to(scores.device)).sum(dim=0)


class KNN(Detector):
    """Deep nearest neighbours (Sun, Ming, Zhu & Li, ICML 2022).

    Embedding: globally average-pooled features, L2-normalised (``z = f / ‖f‖``). Fit: keep the
    normalised reference bank. Score: Euclidean distance to the ``k``-th nearest bank entry
    (higher = more shifted); ``k`` defaults to 50 and is capped at ``n − 1`` for a bank of ``n``.
    """

    name = "knn"
    needs = "features"
    summary = "distance to the k-th nearest in-distribution neighbour of L2-normalised pooled features"
    citation = "Sun, Ming, Zhu & Li, Out-of-Distribution Detection with Deep Nearest Neighbors, ICML 2022"

    def __init__(self, k: int = 50) -> None:
        if k < 1:
            raise ValueError(f"knn k must be >= 1, got {k}")
        self.k = int(k)
        self.bank: Tensor | None = None
        self.k_used: int | None = None

    def embed(self, logits: Tensor, features: Tensor | None) -> Tensor:
        if features is None:
            raise ValueError("knn needs features")
        return torch.nn.functional.normalize(pool(features), dim=1)

    def fit(self, embeddings: Tensor, labels: Tensor) -> None:
        if embeddings.shape[0] < 2:
            raise ValueError(f"knn needs at least 2 reference samples, got {embeddings.shape[0]}")
        # Re-normalise: embeddings may come from a cache written by an older version or a reference set.
        self.bank = torch.nn.functional.normalize(embeddings.double(), dim=1)
        self.k_used = _effective_k(self.k, self.bank.shape[0])

    def score(self, embeddings: Tensor) -> Tensor:
        if self.bank is None or self.k_used is None:
            raise RuntimeError("knn: fit() must be called before score()")
        q = torch.nn.functional.normalize(embeddings.double().to(self.bank.device), dim=1)
        return kth_nn_distance(q, self.bank, self.k_used)


def spectral_signature(features: Tensor) -> Tensor | Future[Tensor]:
    """Log-normalised singular values of each sample's ``C × (spatial)`` feature-map matrix.

    ``F_b = features[b].reshape(C, H·W[·D])``; ``σ_b = svdvals(F_b)`` (descending,
    ``min(C, H·W)`` values); signature ``log(max(σ_b / Σ_j σ_bj, 1e-12))``. Dividing by the sum
    makes the signature invariant to a global rescaling of the activations, so it describes the
    *shape* of the spectrum (how many directions carry the energy). ``[B, D]`` features and 1×1
    maps have no spatial extent (one singular value: a constant signature); they give a NaN
    signature and the detector is skipped. On CUDA the result
    is a future (see :func:`_signature_on_host`).
    """
    if features.ndim < 3 or features[0, 0].numel() == 1:  # [B, D], or 1×1 maps: one singular value, no spectrum
        return torch.full((features.shape[0], 1), float("nan"), dtype=torch.float32, device=features.device)
    mats = features.double().flatten(2)
    # σ² are the eigenvalues of the smaller Gram matrix F Fᵀ (or Fᵀ F): a batched symmetric
    # eigensolve is 2-3x faster than a batched SVD on CPU; float64 keeps small σ accurate.
    gram = mats @ mats.transpose(1, 2) if mats.shape[1] <= mats.shape[2] else mats.transpose(1, 2) @ mats
    if gram.is_cuda:
        return _signature_on_host(gram)
    return _signature(gram, split=True)


def _concatenated(parts: list[Tensor | Future[Tensor]]) -> Future[Tensor]:
    """A future of the concatenated signatures, some of them futures (CUDA stages solved on the host)."""
    done: Future[Tensor] = Future()
    waiting = [p for p in parts if isinstance(p, Future)]
    left = [len(waiting)]

    def finish(_f: Future[Tensor]) -> None:
        left[0] -= 1
        if left[0]:
            return
        try:
            done.set_result(torch.cat([p.result() if isinstance(p, Future) else p.cpu() for p in parts], dim=1))
        except Exception as exc:  # surfaces where the runner resolves the future
            done.set_exception(exc)

    for p in waiting:
        p.add_done_callback(finish)
    return done


def _signature(gram: Tensor, split: bool = False) -> Tensor:
    s = _eigvalsh_split(gram) if split else torch.linalg.eigvalsh(gram)
    s = s.flip(-1).clamp_min(0.0).sqrt().float()
    s = s / s.sum(dim=1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
    return torch.log(s.clamp_min(_SPECTRAL_FLOOR))


def _torch_pool(workers: int, name: str) -> ThreadPoolExecutor:
    """Threads for torch work beside the main thread, each limited to one intra-op thread.

    A thread that runs torch ops with the default intra-op parallelism gets its own OpenMP
    team, and those teams compete with the main thread's for the same cores for the rest of
    the process: after a pool had solved eigenproblems, the bootstrapped OOD measures ran 2x
    slower on a 2-core CPU (the detector and metric phases of an audit 6 s slower).
    """
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name, initializer=torch.set_num_threads,
                              initargs=(1,))


_HOST_POOL: ThreadPoolExecutor | None = None
_SPLIT_POOL: tuple[int, ThreadPoolExecutor] | None = None


def _eigvalsh_split(gram: Tensor) -> Tensor:
    """``torch.linalg.eigvalsh`` of a CPU batch, split over torch's intra-op thread count.

    The batched CPU eigensolver solves one matrix after another on a single thread while the
    other cores idle: on 2 cores a batch of 200 64×64 Gram matrices took 17.5 ms whole and
    9.2 ms in two halves. Each matrix is solved alone either way, so the values are identical.
    """
    global _SPLIT_POOL
    workers = torch.get_num_threads()
    if workers < 2 or gram.shape[0] < 2 * workers:
        return torch.linalg.eigvalsh(gram)
    if _SPLIT_POOL is None or _SPLIT_POOL[0] != workers:  # torch.set_num_threads may have changed it
        _SPLIT_POOL = (workers, _torch_pool(workers, "medaudit-eigvalsh"))
    return torch.cat(list(_SPLIT_POOL[1].map(torch.linalg.eigvalsh, gram.chunk(workers))))


def _signature_on_host(gram: Tensor) -> Future[Tensor]:
    """The eigensolve of CUDA Gram matrices, on the CPU and off the device's critical path.

    Batched CUDA eigensolvers loop over matrices larger than 32×32 (measured ~6x slower than the
    host on an H100), and a synchronous copy to the host would stall the GPU queue at every
    batch (measured: a third of the forward loop with DenseNet121). So the small ``[B, n, n]``
    Gram matrices are copied asynchronously into pinned memory and solved by a host thread while
    the device runs on; the runner resolves the returned future at the end of the shard.
    """
    global _HOST_POOL
    if _HOST_POOL is None:
        # several threads: one batch's eigensolves can take as long as the device's forward pass
        # of it (DenseNet121 on an H100), and a backlog would be waited for at the end of the shard
        _HOST_POOL = _torch_pool(max(1, min(4, (os.cpu_count() or 1) // 4)), "medaudit-spectral")
    host = torch.empty(gram.shape, dtype=gram.dtype, pin_memory=True)
    host.copy_(gram, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()

    def solve() -> Tensor:
        ready.synchronize()
        return _signature(host)

    return _HOST_POOL.submit(solve)


class Spectral(Detector):
    """Spectral signatures of feature maps (Karimi & Gholipour, arXiv:2004.06569).

    Embedding: :func:`spectral_signature` of each stage's feature map (``model.feature_layers``:
    by default the last layer at each of the network's main resolutions; the feature layer alone
    when stages cannot be found), concatenated shallow to deep — the paper's multi-layer
    signature, each layer's spectrum normalised on its own before the concatenation. The paper
    leaves the scoring rule open; medaudit's default (``scoring="whitened"``) is the squared
    distance to the mean in-distribution signature in the space whitened by the Ledoit–Wolf
    covariance of the signatures, ``(s − μ)ᵀ Σ⁻¹ (s − μ)``; ``scoring="knn"`` uses the Euclidean
    distance to the ``k``-th nearest in-distribution signature instead.
    """

    name = "spectral"
    needs = "stages"
    summary = ("distance of the log-normalised singular-value spectra of the stages' feature maps (concatenated) to "
               "in-distribution spectra")
    citation = "Karimi & Gholipour, Improving Calibration and Out-of-Distribution Detection in Medical Image Segmentation with Convolutional Neural Networks, arXiv:2004.06569"

    def __init__(self, scoring: Literal["whitened", "knn"] = "whitened", k: int = 10) -> None:
        if scoring not in ("whitened", "knn"):
            raise ValueError(f"spectral scoring must be 'whitened' or 'knn', got {scoring!r}")
        self.scoring = scoring
        self.k = int(k)
        self.mean: Tensor | None = None
        self.whitener: Tensor | None = None
        self.bank: Tensor | None = None

    def embed(self, logits: Tensor, features: Tensor | list[Tensor] | None) -> Tensor | Future[Tensor]:
        if features is None:
            raise ValueError("spectral needs features")
        parts = [spectral_signature(f) for f in (features if isinstance(features, list) else [features])]
        if any(isinstance(p, Future) for p in parts):
            return _concatenated(parts)
        return torch.cat(parts, dim=1)  # type: ignore[arg-type]

    def fit(self, embeddings: Tensor, labels: Tensor) -> None:
        x = embeddings.double()
        if x.shape[0] < 2:
            raise ValueError(f"spectral needs at least 2 reference samples, got {x.shape[0]}")
        if bool(torch.isnan(x).any()):
            flat = [name for name, shape in self.stages if math.prod(shape[1:]) <= 1]
            where = f"layer(s) {flat}" if flat else "the feature layer"
            raise ValueError(f"spectral signatures are undefined: {where} has no spatial extent "
                             "(its output is [B, D], or its maps are 1×1: one singular value, no spectrum); "
                             "choose earlier convolutional layers")
        self.mean = x.mean(0, keepdim=True)
        if self.scoring == "whitened":
            cov, _ = ledoit_wolf(x - self.mean)
            self.whitener = _whitener(cov)
        else:
            self.bank = x

    def score(self, embeddings: Tensor) -> Tensor:
        if self.mean is None:
            raise RuntimeError("spectral: fit() must be called before score()")
        x = embeddings.double().to(self.mean.device)
        if self.scoring == "whitened":
            assert self.whitener is not None
            return _sq_mahalanobis(x, self.mean, self.whitener)[:, 0]
        assert self.bank is not None
        return kth_nn_distance(x, self.bank, _effective_k(self.k, self.bank.shape[0]))
