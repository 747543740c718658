"""The pure-torch Philox4x32-10 / Gaussian stream (pnekern.reference.philox) against the Random123 known-answer
vectors (the same ones csrc/tests/test_philox.cpp checks) and the contract of csrc/include/pnekern/philox.h.
Needs no Triton."""
from __future__ import annotations

import math

import pytest
import torch

from pnekern.reference import philox as ref

# Random123 kat_vectors: philox4x32 10 rounds (counter, key, expected output).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,want", KAT, ids=["zero", "all-ones", "pi-digits"])
def test_known_answer_vectors(counter, key, want):
    assert ref.philox4x32_10(counter, key).tolist() == list(want)
    # batched form: a [n, 4] counter tensor
    got = ref.philox4x32_10(torch.tensor([counter, counter], dtype=torch.int64), key)
    assert got.tolist() == [list(want)] * 2


def test_stream_layout_uses_seed_and_counter_words():
    seed, grp, tidx, step = 0x0123456789ABCDEF, 0x00000005FFFFFFFE, 7, 42
    words = ref.philox_words(seed, step, tidx, 1, offset=grp)[0]
    direct = ref.philox4x32_10((0xFFFFFFFE, 5, 7, 42), (0x89ABCDEF, 0x01234567))
    assert words.tolist() == direct.tolist()
    # element e's uniform is word e & 3 of counter e >> 2
    elem = 4 * grp + 2
    u = ref.philox_uniform(seed, step, tidx, 3, offset=elem)
    following = ref.philox_words(seed, step, tidx, 1, offset=grp + 1)[0]
    assert u.tolist() == ref.uniform_open0(torch.cat([direct[2:], following[:1]])).tolist()


def test_uniform_open0_extremes_are_exact():
    u = ref.uniform_open0(torch.tensor([0, 0xFFFFFFFF, 0x80000000], dtype=torch.int64))
    assert u.dtype == torch.float32
    assert u.tolist() == [2.0**-24, 1.0, 0.5 + 2.0**-24]


def test_normal_is_box_muller_of_the_lanes_word_pair():
    """Elements 4c .. 4c+3 share counter c: (ρ_a cos θ_a, ρ_a sin θ_a) from words 0/1, then (ρ_b cos θ_b, ρ_b sin θ_b)
    from words 2/3 — checked in float64 math against the fp32 stream."""
    grp = 12345
    words = ref.philox_words(2024, 9, 3, 1, offset=grp)[0]
    u = [((int(w) >> 8) + 1) * 2.0**-24 for w in words]
    want = []
    for u1, u2 in ((u[0], u[1]), (u[2], u[3])):
        rho, theta = math.sqrt(-2.0 * math.log(u1)), 2 * math.pi * u2
        want += [rho * math.cos(theta), rho * math.sin(theta)]
    got = ref.philox_normal(2024, 9, 3, 4, offset=4 * grp)
    assert got.dtype == torch.float32
    for g, w in zip(got.tolist(), want):
        assert abs(g - w) <= 4e-6 * max(1.0, abs(w)), (got, want)
    # a slice that starts mid-counter is the same stream
    assert torch.equal(ref.philox_normal(2024, 9, 3, 2, offset=4 * grp + 1), got[1:3])


def test_slices_of_the_stream_are_the_stream():
    full = ref.philox_normal(11, 3, 2, 300)
    for off, n in ((150, 100), (151, 1), (3, 9), (0, 300), (297, 3)):
        torch.testing.assert_close(ref.philox_normal(11, 3, 2, n, offset=off), full[off : off + n], rtol=0, atol=0)
    u = ref.philox_uniform(11, 3, 2, 300)
    assert torch.equal(ref.philox_uniform(11, 3, 2, 7, offset=61), u[61:68])
    # the counter's high word: elements on both sides of 2^32
    w = ref.philox_words(5, 1, 0, 4, offset=2**32 - 2)
    assert w[2].tolist() == ref.philox4x32_10((0, 1, 0, 1), (5, 0)).tolist()


def test_moments_and_independence():
    n = 1 << 16
    z = ref.philox_normal(7, 1, 1, n).double()
    assert bool(torch.isfinite(z).all())
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 0.03
    z2 = ref.philox_normal(7, 1, 2, n).double()  # another tensor index: another stream
    assert abs((z * z2).mean().item()) < 5 / math.sqrt(n)
    z3 = ref.philox_normal(7, 2, 1, n).double()  # another step
    assert abs((z * z3).mean().item()) < 5 / math.sqrt(n)
    # the four normals of a counter are uncorrelated with each other (the two of a pair share ρ, not θ), and so are
    # the pair partners' squares (cos² and sin² of one θ are dependent only through ρ)
    lanes = z.view(-1, 4)
    for i in range(4):
        for j in range(i + 1, 4):
            assert abs((lanes[:, i] * lanes[:, j]).mean().item()) < 5 / math.sqrt(n / 4), (i, j)
