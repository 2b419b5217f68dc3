"""Every random stream of an audit: the counter-based per-sample RNG (exact construction,
distributions, independence, invariance) and the named whole-array streams (each is its
documented key, and nothing in the audit seeds a generator any other way).

Everything here is deterministic (fixed keys), so the statistical thresholds cannot flake: they
either hold for the generator's numbers or they do not. They are set at about 5 standard errors
(or a KS p-value of 1e-4), loose enough for any sound generator and far below what a broken one
(a constant stream, correlated samples, a wrong Box-Muller branch) produces.
"""

from __future__ import annotations

import ast
import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import medaudit.rng
from medaudit.bootstrap import bootstrap_weights
from medaudit.rng import STREAMS, SampleRNG, sample_keys, stream_generator, stream_key
from medaudit.shift import cross_fit_halves
from medaudit.temperature import fit_inverse_temperature, temperature_report

stats = pytest.importorskip("scipy.stats")

M32 = 0xFFFFFFFF
M64 = 0xFFFFFFFFFFFFFFFF


# --- pure-Python reference of the construction documented in medaudit.rng -------------------


def ref_m32(x: int) -> int:
    x &= M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def ref_m64(x: int) -> int:
    x &= M64
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & M64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def ref_word32(key: int, counter: int) -> int:
    return ref_m32(ref_m32(key ^ ref_m32(2 * counter + 1)) + 0x9E3779B9)


def ref_normals(key: int, first_counter: int, n: int) -> np.ndarray:
    """float64 reference of ``normal(n)`` for one sample whose counter is at ``first_counter``."""
    m = (n + 1) // 2
    seed = ref_m64(key)
    out = np.empty(n)
    for j in range(m):
        h = ref_m64(seed + (first_counter + j + 1) * 0x9E3779B97F4A7C15)
        u1 = ((h >> 40) + 0.5) / 2**24
        u2 = ((h & 0xFFFFFF) + 0.5) / 2**24
        r = math.sqrt(-2.0 * math.log(u1))
        out[j] = r * math.cos(2.0 * math.pi * u2)
        if m + j < n:
            out[m + j] = r * math.sin(2.0 * math.pi * u2)
    return out


def keys_for(n: int, name: str = "test", seed: int = 0) -> torch.Tensor:
    return sample_keys(stream_key(seed, name), torch.arange(n))


# --- exact construction -----------------------------------------------------------------------


def test_keys_and_bits_match_the_documented_hash() -> None:
    base = stream_key(3, "xray.noise", 2)
    idx = [0, 1, 7, 123456]
    keys = sample_keys(base, torch.tensor(idx))
    assert keys.tolist() == [ref_m32(ref_m32(i + 0x9E3779B9) ^ base) for i in idx]
    rng = SampleRNG(keys)
    first = rng.bits(5)
    second = rng.bits(2)  # the counter continues at 5
    for b, k in enumerate(keys.tolist()):
        assert first[b].tolist() == [ref_word32(k, c) for c in range(5)]
        assert second[b].tolist() == [ref_word32(k, c) for c in range(5, 7)]
    child = SampleRNG(keys).child("grid")
    assert child.keys.tolist() == [ref_m32(k ^ stream_key("grid")) for k in keys.tolist()]


@pytest.mark.parametrize("n", [1, 2, 7, 130])
def test_normal_matches_the_documented_splitmix_box_muller(n: int) -> None:
    """Also checks that int64 multiplication wraps modulo 2**64 as the 64-bit hash assumes."""
    keys = keys_for(3, "normal-kat")
    rng = SampleRNG(keys)
    rng.bits(4)  # normals start at counter 4
    z = rng.normal(n)
    for b, k in enumerate(keys.tolist()):
        np.testing.assert_allclose(z[b].double().numpy(), ref_normals(k, 4, n), rtol=0, atol=2e-5)
    # a draw of n normals uses ceil(n / 2) counters
    assert rng.bits(1)[:, 0].tolist() == [ref_word32(k, 4 + (n + 1) // 2) for k in keys.tolist()]


def test_normal_pairs_share_a_radius() -> None:
    """Value j is r cos(theta) and value m + j is r sin(theta) of the same hash."""
    keys = keys_for(2)
    n = 1001
    m = (n + 1) // 2
    z = SampleRNG(keys).normal(n).double()
    r2 = z[:, : n - m] ** 2 + z[:, m:] ** 2
    seed = [ref_m64(k) for k in keys.tolist()]
    for b in range(2):
        for j in (0, 17, n - m - 1):
            h = ref_m64(seed[b] + (j + 1) * 0x9E3779B97F4A7C15)
            expected = -2.0 * math.log(((h >> 40) + 0.5) / 2**24)
            assert r2[b, j].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_draw_shapes_and_dtypes() -> None:
    rng = SampleRNG(keys_for(3))
    assert rng.normal(2, 5, 4).shape == (3, 2, 5, 4) and rng.normal(1).dtype == torch.float32
    assert rng.normal(0).shape == (3, 0)
    assert rng.uniform(4).dtype == torch.float32 and rng.bits(2).dtype == torch.int64
    assert SampleRNG(keys_for(0)).normal(5).shape == (0, 5)


# --- distributions ----------------------------------------------------------------------------


def test_uniform_distribution() -> None:
    u = SampleRNG(keys_for(4)).uniform(50_000).double().flatten().numpy()
    n = u.size
    assert 0.0 < u.min() and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(u.var() - 1 / 12) < 5 * math.sqrt(1 / 180 / n)
    assert stats.kstest(u, "uniform").pvalue > 1e-4
    counts = np.bincount(np.floor(u * 64).astype(int), minlength=64)
    assert stats.chisquare(counts).pvalue > 1e-4


def test_normal_distribution() -> None:
    z = SampleRNG(keys_for(4)).normal(100_001).double().flatten().numpy()
    n = z.size
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1.0) < 5 * math.sqrt(2 / n)
    assert abs(stats.skew(z)) < 5 * math.sqrt(6 / n)
    assert abs(stats.kurtosis(z)) < 5 * math.sqrt(24 / n)  # excess kurtosis
    assert stats.kstest(z, "norm").pvalue > 1e-4
    assert np.abs(z).max() <= math.sqrt(2 * math.log(2**25)) + 1e-5  # the documented 24-bit bound
    # the cosine and the sine halves are each standard normal (not just their mixture)
    halves = SampleRNG(keys_for(1, "halves")).normal(200_000)[0].double().numpy()
    for half in (halves[:100_000], halves[100_000:]):
        assert stats.kstest(half, "norm").pvalue > 1e-4


def test_integers_and_choice() -> None:
    rng = SampleRNG(keys_for(2))
    v = rng.integers(3, 10, 20_000)
    assert int(v.min()) == 3 and int(v.max()) == 9
    counts = torch.bincount(v.flatten() - 3, minlength=7).numpy()
    assert stats.chisquare(counts).pvalue > 1e-4
    options = torch.tensor([0.5, 1.5, 2.5])
    assert set(rng.choice(options, 50).flatten().tolist()) == {0.5, 1.5, 2.5}


# --- independence -----------------------------------------------------------------------------


def _max_abs_corr(rows: np.ndarray) -> float:
    c = np.corrcoef(rows)
    return float(np.abs(c[~np.eye(len(c), dtype=bool)]).max())


def test_samples_and_keys_are_independent() -> None:
    n = 40_000
    bound = 5 / math.sqrt(n)
    # neighbouring dataset indices, and the same index under neighbouring seeds / stream names
    neighbours = SampleRNG(keys_for(8)).normal(n).double().numpy()
    seeds = torch.cat([keys_for(1, "test", s) for s in range(6)])
    names = torch.cat([keys_for(1, f"stream{i}") for i in range(6)])
    for keys in (seeds, names):
        assert len(set(keys.tolist())) == len(keys)
    for block in (neighbours, SampleRNG(seeds).normal(n).double().numpy(), SampleRNG(names).normal(n).double().numpy()):
        assert _max_abs_corr(block) < bound
    u = SampleRNG(keys_for(8)).uniform(n).double().numpy()
    assert _max_abs_corr(u) < bound
    children = torch.stack([SampleRNG(keys_for(1)).child(f"c{i}").normal(n)[0] for i in range(4)]).double().numpy()
    assert _max_abs_corr(children) < bound


def test_successive_draws_and_neighbours_are_independent() -> None:
    rng = SampleRNG(keys_for(2))
    n = 40_000
    bound = 5 / math.sqrt(n)
    a, b = rng.normal(n).double().numpy(), rng.normal(n).double().numpy()
    u = rng.uniform(n).double().numpy()
    for s in range(2):
        assert _max_abs_corr(np.stack([a[s], b[s], u[s]])) < bound
        for seq in (a[s], u[s]):
            assert abs(np.corrcoef(seq[:-1], seq[1:])[0, 1]) < bound  # lag-1 within a draw
        # value j and its Box-Muller partner m + j: independent normals, so uncorrelated,
        # and so are their squares (a shared radius would correlate those)
        half = n // 2
        assert abs(np.corrcoef(a[s][:half], a[s][half:])[0, 1]) < 5 / math.sqrt(half)
        assert abs(np.corrcoef(a[s][:half] ** 2, a[s][half:] ** 2)[0, 1]) < 5 / math.sqrt(half)


# --- determinism and invariance ---------------------------------------------------------------


def test_same_key_same_numbers() -> None:
    keys = keys_for(3)
    assert torch.equal(SampleRNG(keys).normal(777), SampleRNG(keys.clone()).normal(777))
    assert not torch.equal(SampleRNG(keys).normal(777)[0], SampleRNG(keys).normal(777)[1])


@pytest.mark.parametrize("n", [1, 63, 64, 1001, 70_001])
def test_batch_composition_and_thread_count_do_not_change_a_sample(n: int) -> None:
    """Bit-identical whatever the batch and the number of CPU threads (the float steps must not
    take a different code path for a sample depending on where its row lands)."""
    keys = keys_for(7, "invariance")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        reference = SampleRNG(keys).normal(n)
        ref_uniform = SampleRNG(keys).uniform(n)
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for split in (1, 3, 6):
                a, b = keys[:split], keys[split:]
                assert torch.equal(torch.cat([SampleRNG(a).normal(n), SampleRNG(b).normal(n)]), reference), (threads, split)
                assert torch.equal(torch.cat([SampleRNG(a).uniform(n), SampleRNG(b).uniform(n)]), ref_uniform), (threads, split)
            perm = torch.tensor([4, 0, 6, 2, 1, 5, 3])
            assert torch.equal(SampleRNG(keys[perm]).normal(n), reference[perm])
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_and_cuda_agree() -> None:
    """Integers are identical on both devices; floats agree to the device's libm rounding."""
    keys = keys_for(5, "devices")
    cpu, gpu = SampleRNG(keys), SampleRNG(keys.cuda())
    assert torch.equal(cpu.bits(1000), gpu.bits(1000).cpu())
    assert torch.equal(cpu.uniform(1000), gpu.uniform(1000).cpu())
    torch.testing.assert_close(gpu.normal(100_001).cpu(), cpu.normal(100_001), rtol=0, atol=1e-5)
    assert torch.equal(cpu.integers(0, 7, 100), gpu.integers(0, 7, 100).cpu())


# --- the named whole-array streams: one derivation ---------------------------------------------


def ref_stream_key(*parts: object) -> int:
    """The documented key: the first 4 bytes, little-endian, of BLAKE2b of ``repr(parts)``."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=4).digest(), "little")


def ref_generator(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(ref_stream_key(*parts))


def test_stream_key_is_the_documented_hash() -> None:
    assert stream_key(0, "bootstrap") == ref_stream_key(0, "bootstrap")
    assert stream_key(5, "subgroup-permutations", "sex") == ref_stream_key(5, "subgroup-permutations", "sex")
    # the perturbation streams' keys, which the pinned results depend on, are the same function
    assert stream_key(3, "mri.motion", 2) == ref_stream_key(3, "mri.motion", 2)
    assert stream_key(1, "bootstrap") != stream_key(0, "bootstrap") != stream_key(0, "cross-fit")


def _counts(idx: torch.Tensor, n: int) -> torch.Tensor:
    return torch.stack([torch.bincount(row, minlength=n) for row in idx]).float()


def test_bootstrap_weights_are_the_bootstrap_stream() -> None:
    n, r = 37, 6
    w = bootstrap_weights(n, r, seed=4)
    assert torch.equal(w[0], torch.ones(n))
    assert torch.equal(w[1:], _counts(torch.randint(0, n, (r, n), generator=ref_generator(4, "bootstrap")), n))
    # an external OOD set's resamples: its own stream, the key evaluate.py always used for it
    ext = bootstrap_weights(n, r, seed=4, ood_set="site-b")
    assert torch.equal(ext[1:], _counts(torch.randint(0, n, (r, n), generator=ref_generator(4, "ood-data", "site-b")), n))
    assert not torch.equal(ext, w)
    assert not torch.equal(ext, bootstrap_weights(n, r, seed=4, ood_set="site-c"))


def test_cross_fit_halves_are_the_cross_fit_stream() -> None:
    perm = torch.randperm(50, generator=ref_generator(7, "cross-fit"))
    a, b = cross_fit_halves(50, 7)
    assert torch.equal(a, perm[:25].sort().values) and torch.equal(b, perm[25:].sort().values)


def test_temperature_folds_are_the_temperature_folds_stream() -> None:
    """The fold temperatures are those fitted without each fold of the reference permutation."""
    gen = torch.Generator().manual_seed(11)
    n, k, folds = 60, 3, 4
    labels = torch.randint(0, k, (n,), generator=gen)
    probs = torch.softmax(torch.randn(n, k, generator=gen, dtype=torch.float64) + 2 * torch.nn.functional.one_hot(labels, k), 1)
    rep = temperature_report(probs[None], labels, ["clean"], "multiclass", n_bins=10, seed=3, folds=folds)
    perm = torch.randperm(n, generator=ref_generator(3, "temperature-folds"))
    expected = []
    for held_out in torch.tensor_split(perm, folds):
        train = torch.ones(n, dtype=torch.bool)
        train[held_out] = False
        logits = torch.log(probs[train].clamp(torch.finfo(probs.dtype).eps, 1 - torch.finfo(probs.dtype).eps))
        expected.append(1.0 / fit_inverse_temperature(logits, labels[train]))
    assert rep["fold_temperatures"] == expected
    assert temperature_report(probs[None], labels, ["clean"], "multiclass", 10, seed=4, folds=folds)["fold_temperatures"] != expected


def test_subgroup_permutations_are_the_attribute_stream() -> None:
    from medaudit.plugins.subgroups import Permutations

    codes = torch.arange(30) % 3
    perms = torch.cat(list(Permutations(codes, 8, seed=2, attribute="sex")))
    order = torch.argsort(torch.rand(8, 30, generator=ref_generator(2, "subgroup-permutations", "sex")), dim=1)
    assert torch.equal(perms, codes[order])
    other = torch.cat(list(Permutations(codes, 8, seed=2, attribute="site")))
    assert not torch.equal(other, perms)  # each attribute its own stream


def test_streams_are_reproducible_and_differ_between_seeds() -> None:
    draws = {
        "bootstrap": lambda s: bootstrap_weights(40, 5, s),
        "ood-data": lambda s: bootstrap_weights(40, 5, s, ood_set="x"),
        "cross-fit": lambda s: cross_fit_halves(40, s)[0],
        "subgroup-permutations": lambda s: torch.cat(list(_permutations(s))),
    }
    for name, draw in draws.items():
        assert torch.equal(draw(0), draw(0)), name
        assert not torch.equal(draw(0), draw(1)), name


def _permutations(seed: int) -> object:
    from medaudit.plugins.subgroups import Permutations

    return Permutations(torch.arange(40) % 2, 5, seed=seed, attribute="a")


def test_streams_with_one_seed_are_independent() -> None:
    """Before the streams were named, the cross-fitting split and the temperature folds were one
    permutation, and its first element was the first index of the first bootstrap resample for
    every seed (the same Mersenne Twister words). Now they agree only as often as chance has it."""
    n = 1000
    tied_before = tied_now = 0
    for seed in range(40):
        raw = torch.Generator().manual_seed(seed)
        first_resample_index = int(torch.randint(0, n, (1, n), generator=raw)[0, 0])
        tied_before += int(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[0]) == first_resample_index
        resample = torch.randint(0, n, (1, n), generator=stream_generator(seed, "bootstrap"))[0]
        split = torch.randperm(n, generator=stream_generator(seed, "cross-fit"))
        folds = torch.randperm(n, generator=stream_generator(seed, "temperature-folds"))
        tied_now += int(split[0]) == int(resample[0])
        assert not torch.equal(split, folds)
        # a sample's membership of half A says nothing about its count in the resample: the
        # mean count of half A's samples is 1 up to the resample's noise (sd ~ 0.045 at n = 1000)
        counts = torch.bincount(resample, minlength=n).double()
        assert abs(float(counts[split[: n // 2]].mean()) - 1.0) < 0.2
    assert tied_before == 40  # the tie the named keys remove (a property of torch's CPU generator)
    assert tied_now <= 2  # chance: 40 / 1000 expected


def test_stream_draws_do_not_depend_on_the_device_or_chunking() -> None:
    assert stream_generator(0, "bootstrap").device.type == "cpu"
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    reference = bootstrap_weights(64, 9, 5)
    for device in devices:
        assert torch.equal(bootstrap_weights(64, 9, 5, device=device).cpu(), reference)
    # permutations regenerated chunk by chunk are the ones drawn at once
    from medaudit.plugins.subgroups import Permutations

    cached = Permutations(torch.arange(50) % 4, 23, seed=1, attribute="a")
    chunked = Permutations(torch.arange(50) % 4, 23, seed=1, attribute="a")
    chunked.chunk, chunked._cache = 5, None
    assert torch.equal(torch.cat(list(chunked)), torch.cat(list(cached)))


# --- the derivation is the one function: nothing in the audit seeds a generator itself ---------

ROOT = Path(__file__).resolve().parents[1]
_SEEDING = {"manual_seed", "seed", "Generator", "default_rng", "RandomState", "fork_rng", "initial_seed"}
# torch.<name>(...) and tensor.<name>_(...) draw from torch's global generator unless given one.
_TORCH_DRAWS = {"rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like", "multinomial",
                "bernoulli", "normal", "poisson"}
_INPLACE_DRAWS = {"uniform_", "normal_", "random_", "exponential_", "geometric_", "cauchy_", "log_normal_", "bernoulli_"}


def _name(node: ast.expr) -> str:
    return node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else ""


def randomness_problems(source: str, where: str) -> tuple[list[str], set[str]]:
    """Problems with how ``source`` draws random numbers, and the named streams it uses.

    Allowed: :func:`medaudit.rng.stream_generator` with the audit seed (an expression ending in
    ``seed``) and a literal name from :data:`medaudit.rng.STREAMS`, and draws that pass
    ``generator=``. Anything that seeds a generator, or draws from a global one, is a problem.
    """
    problems: list[str] = []
    used: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(m == "random" or m.startswith("numpy.random") for m in modules):
                problems.append(f"{where}:{node.lineno}: imports {modules}")
        if isinstance(node, ast.Attribute) and node.attr == "random" and _name(node.value) in {"np", "numpy"}:
            problems.append(f"{where}:{node.lineno}: numpy's global random state")
        if not isinstance(node, ast.Call):
            continue
        fn = _name(node.func)
        if fn in _SEEDING:
            problems.append(f"{where}:{node.lineno}: {fn}() seeds a generator outside medaudit.rng")
        elif (fn in _INPLACE_DRAWS or fn in _TORCH_DRAWS and isinstance(node.func, ast.Attribute)
              and _name(node.func.value) == "torch") and not any(k.arg == "generator" for k in node.keywords):
            problems.append(f"{where}:{node.lineno}: {fn}() without generator= draws from the global RNG")
        elif fn == "stream_generator":
            args = node.args
            name = args[1].value if len(args) > 1 and isinstance(args[1], ast.Constant) else None
            if not args or not _name(args[0]).endswith("seed"):
                problems.append(f"{where}:{node.lineno}: stream_generator() must get the audit seed first")
            if name not in STREAMS:
                problems.append(f"{where}:{node.lineno}: stream_generator() with {name!r}, not a name in rng.STREAMS")
            else:
                used.add(name)
    return problems, used


def test_the_randomness_checker_catches_each_way_around_the_derivation() -> None:
    bad = {
        "gen = torch.Generator(device='cpu').manual_seed(int(seed))": "seeds a generator",
        "idx = torch.randint(0, n, (r, n))": "global RNG",
        "x = np.random.rand(3)": "numpy",
        "x = np.random.default_rng(seed).integers(3)": "default_rng() seeds",
        "x.normal_()": "global RNG",
        "import random": "imports",
        "g = stream_generator(stream_key(seed, 'x'), 'bootstrap')": "audit seed first",
        "g = stream_generator(seed, 'boot')": "not a name",
        "g = stream_generator(seed, name)": "not a name",
    }
    for source, why in bad.items():
        problems, _ = randomness_problems(source, "x.py")
        assert any(why in p for p in problems), (source, problems)
    good = "g = stream_generator(self.seed, 'subgroup-permutations', a)\np = torch.randperm(n, generator=g)"
    assert randomness_problems(good, "x.py") == ([], {"subgroup-permutations"})


def test_every_stream_is_derived_through_medaudit_rng() -> None:
    """Every module of the core and the built-in plugins, except rng.py itself and the testing
    kit's synthetic fixtures (fixed seeds that are not audit streams)."""
    problems: list[str] = []
    used: set[str] = set()
    files = sorted((ROOT / "audit").rglob("*.py")) + sorted((ROOT / "plugins").rglob("*.py"))
    assert len(files) > 20
    for path in files:
        rel = path.relative_to(ROOT)
        if rel == Path("audit/rng.py") or rel.parts[:2] in {("audit", "testing.py"), ("audit", "testing")}:
            continue
        found, names = randomness_problems(path.read_text(), str(rel))
        problems += found
        used |= names
    assert not problems, "\n".join(problems)
    assert used == set(STREAMS), f"streams declared in rng.STREAMS but never drawn: {set(STREAMS) - used}"


def test_every_stream_is_documented() -> None:
    docs = (ROOT / "docs" / "randomness.md").read_text()
    for name in STREAMS:
        assert f'"{name}"' in docs, name
        assert f'"{name}"' in medaudit.rng.__doc__, name
