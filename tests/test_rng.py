"""The counter-based per-sample RNG: exact construction, distributions, independence, invariance.

Everything here is deterministic (fixed keys), so the statistical thresholds cannot flake: they
either hold for the generator's numbers or they do not. They are set at about 5 standard errors
(or a KS p-value of 1e-4), loose enough for any sound generator and far below what a broken one
(a constant stream, correlated samples, a wrong Box-Muller branch) produces.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medaudit.rng import SampleRNG, sample_keys, stream_key

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
