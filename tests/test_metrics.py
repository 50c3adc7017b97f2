"""Unit tests of the metrics: each on an input whose answer is worked out by hand (in the comments)."""
import math
import types

import numpy as np
import pytest

import common as cm


def fake_geom(layer, x, y, names=None, name="fake"):
    layer = np.asarray(layer)
    n_layers = int(layer.max()) + 1
    return types.SimpleNamespace(
        name=name, layer=layer, x=np.asarray(x, float), y=np.asarray(y, float),
        n_layers=n_layers, layer_names=tuple(names or [str(i) for i in range(n_layers)]),
        shape=(len(layer),), n_cells=len(layer))


# 4 cells: layer 0 at x = 0, 2 (y = 0); layer 1 at (x, y) = (0, 1), (2, 3)
GEOM = fake_geom([0, 0, 1, 1], [0, 2, 0, 2], [0, 0, 1, 3])
CELLS = np.array([[1.0, 3.0, 2.0, 4.0], [0.0, 0.0, 0.0, 0.0]], np.float32)


@pytest.fixture
def tiny_chunks(monkeypatch):
    """Force many chunks so chunked loops are exercised with ragged ends."""
    monkeypatch.setattr(cm, "_CHUNK_ELEMENTS", 7)


def atlas_geom(n_middle, n_strip, n_pre, n_back):
    # vector order Middle, Strip, PreSampler, Back; layer index 0 Pre, 1 Strip, 2 Middle, 3 Back
    layer = np.repeat([2, 1, 0, 3], [n_middle, n_strip, n_pre, n_back])
    return fake_geom(layer, np.zeros(len(layer)), np.zeros(len(layer)),
                     names=("PreSampler", "Strip", "Middle", "Back"), name="atlas")


# ------------------------------------------------------------------ simple observables

def test_sampling_fraction():
    # event sums 1+2+3+4 = 10 and 8*3 = 24 over Ep 500 and 1200 -> 0.02 both
    cells = np.stack([np.arange(1, 5).reshape(2, 2), np.full((2, 2), 6.0)]).astype(np.float32)
    np.testing.assert_allclose(cm.sampling_fraction(cells, np.array([500.0, 1200.0])), [0.02, 0.02])


def test_binned_stat():
    # edges [0,1,2,3,4]: bin0 gets (0.5->1, 0.7->3): mean 2, std 1; bin1 empty -> NaN, count 0;
    # bin2 gets (2.0->20, 2.5->40): mean 30 std 10; bin3 is closed: 4.0->7; -1 and 5 dropped
    x = np.array([0.5, 0.7, 2.0, 2.5, 4.0, 5.0, -1.0])
    v = np.array([1.0, 3.0, 20.0, 40.0, 7.0, 99.0, 99.0])
    mean, std, count = cm.binned_stat(x, v, [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(count, [2, 0, 2, 1])
    np.testing.assert_allclose(mean, [2, np.nan, 30, 7])
    np.testing.assert_allclose(std, [1, np.nan, 10, 0])


def test_axis_profiles(tiny_chunks):
    # arange(8) as (2,2,2): value = 4i + 2j + k; sums over the other two axes:
    # axis0 [0+1+2+3, 4+5+6+7] = [6, 22]; axis1 [0+1+4+5, 2+3+6+7] = [10, 18]; axis2 [12, 16]
    img = np.stack([np.arange(8).reshape(2, 2, 2)] * 3).astype(np.float32)
    prof = cm.axis_profiles(img)
    assert [p.shape for p in prof] == [(3, 2)] * 3
    np.testing.assert_allclose(prof[0], [[6, 22]] * 3)
    np.testing.assert_allclose(prof[1], [[10, 18]] * 3)
    np.testing.assert_allclose(prof[2], [[12, 16]] * 3)


def test_axis_moments():
    # two-cell shower along the last axis: E=1 at index 0, E=3 at index 2:
    # centre (0*1 + 2*3)/4 = 1.5; variance (1*1.5^2 + 3*0.5^2)/4 = 0.75;
    # third central moment (1*(-1.5)^3 + 3*0.5^3)/4 = -0.75; empty event -> 0
    img = np.zeros((2, 1, 4))
    img[0, 0, 0], img[0, 0, 2] = 1.0, 3.0
    m = cm.axis_moments(img, orders=(1, 2, 3))
    np.testing.assert_allclose(m[(1, 1)], [1.5, 0])
    np.testing.assert_allclose(m[(1, 2)], [0.75, 0])
    np.testing.assert_allclose(m[(1, 3)], [-0.75, 0])
    np.testing.assert_allclose(m[(0, 1)], [0, 0])
    np.testing.assert_allclose(m[(0, 2)], [0, 0])
    # with 10 mm cells at 0, 10, 20, 30: centre 15 mm, variance 75 mm^2
    m = cm.axis_moments(img, coords_list=[None, [0, 10, 20, 30]])
    np.testing.assert_allclose(m[(1, 1)], [15, 0])
    np.testing.assert_allclose(m[(1, 2)], [75, 0])


# ------------------------------------------------------------------ per-layer observables

def test_energy_and_fraction_per_layer(tiny_chunks):
    # layer 0: 1 + 3 = 4, layer 1: 2 + 4 = 6 -> fractions 0.4, 0.6; empty event -> 0, 0
    np.testing.assert_allclose(cm.energy_per_layer(CELLS, GEOM), [[4, 6], [0, 0]])
    np.testing.assert_allclose(cm.fraction_per_layer(CELLS, GEOM), [[0.4, 0.6], [0, 0]])


def test_energy_per_layer_rejects_wrong_cell_count():
    with pytest.raises(ValueError):
        cm.energy_per_layer(np.ones((2, 5)), GEOM)


def test_centre_width_per_layer(tiny_chunks):
    # layer 0: E 1 at x=0, E 3 at x=2: <x> = 6/4 = 1.5, <x^2> = 12/4 = 3, width sqrt(3-2.25)
    #          y = 0 for both: centre 0, width 0
    # layer 1: E 2 at (0,1), E 4 at (2,3): <x> = 8/6 = 4/3, <x^2> = 16/6, var = 8/9;
    #          <y> = 14/6 = 7/3, <y^2> = 38/6, var = 38/6 - 49/9 = 8/9
    # empty event: all 0
    r = cm.centre_width_per_layer(CELLS, GEOM)
    np.testing.assert_allclose(r["centre_x"], [[1.5, 4 / 3], [0, 0]])
    np.testing.assert_allclose(r["width_x"], [[math.sqrt(0.75), math.sqrt(8 / 9)], [0, 0]])
    np.testing.assert_allclose(r["centre_y"], [[0, 7 / 3], [0, 0]], atol=1e-12)
    np.testing.assert_allclose(r["width_y"], [[0, math.sqrt(8 / 9)], [0, 0]], atol=1e-12)


def test_centre_width_precision_at_large_offset():
    # two equal cells at eta = 1000 and 1000 + 1e-4: width 0.5e-4 exactly; the naive
    # <x^2> - <x>^2 in float64 would be off by ~1e-10 in the variance (~10% of 2.5e-9)
    g = fake_geom([0, 0], [1000.0, 1000.0001], [0, 0])
    r = cm.centre_width_per_layer(np.array([[1.0, 1.0]]), g)
    np.testing.assert_allclose(r["width_x"], [[0.5e-4]], rtol=1e-6)
    np.testing.assert_allclose(r["centre_x"], [[1000.00005]], rtol=1e-12)


def test_middle_core_fraction_atlas89():
    g = atlas_geom(21, 48, 6, 14)
    cells = np.zeros((4, 89))
    cells[0, :21] = 1.0          # flat Middle: core 3x3 of 3x7 -> 9/21
    cells[1, 10] = 5.0           # centre cell (eta 1, phi 3) ...
    cells[1, 0] = 5.0            # ... and a corner -> 0.5
    cells[1, 30] = 100.0         # Strip energy does not count
    cells[2, [2, 4, 16, 18]] = 1.0   # the four corners of the core (phi 2..4) -> 1
    cells[2, [1, 5]] = 2.0       # phi 1 and phi 5 are outside -> 4 / 8 = 0.5
    # event 3: no Middle energy -> 0
    cells[3, 50] = 1.0
    np.testing.assert_allclose(cm.middle_core_fraction(cells, g), [9 / 21, 0.5, 0.5, 0])


def test_middle_core_fraction_atlas247():
    # Middle 7x11: core rows 2..4, cols 4..6; cell 26 = (2, 4) is in, 16 = (1, 5) is out -> 1/4
    g = atlas_geom(77, 112, 14, 44)
    cells = np.zeros((1, 247))
    cells[0, 26], cells[0, 16] = 1.0, 3.0
    np.testing.assert_allclose(cm.middle_core_fraction(cells, g), [0.25])


# ------------------------------------------------------------------ cell-level statistics

def test_cell_variance(tiny_chunks):
    # column 0: 0, 2, 4 -> mean 2, variance (4 + 0 + 4)/3 = 8/3; column 1 constant -> 0
    np.testing.assert_allclose(cm.cell_variance(np.array([[0, 1], [2, 1], [4, 1]], np.float32)), [8 / 3, 0])


def test_correlation_matrix(tiny_chunks):
    # a = 1,2,3,4; b = 4,3,2,1 = -a -> -1; c = 1,1,0,2: centred (0,0,-1,1), a centred
    # (-1.5,-.5,.5,1.5): dot 1, norms sqrt(5), sqrt(2) -> 1/sqrt(10); d constant -> 0, diag 1
    a = [1, 2, 3, 4]
    b = [4, 3, 2, 1]
    c = [1, 1, 0, 2]
    d = [5, 5, 5, 5]
    r = 1 / math.sqrt(10)
    expected = [[1, -1, r, 0], [-1, 1, -r, 0], [r, -r, 1, 0], [0, 0, 0, 1]]
    np.testing.assert_allclose(cm.correlation_matrix(np.array([a, b, c, d], float).T), expected, atol=1e-12)
    # constant cells whose float mean is not exact (0.1*3/3 != 0.1) leave rounding residues
    # that must not read as a perfect correlation: still the identity
    const = np.array([[0.1, 0.7]] * 3)
    np.testing.assert_array_equal(cm.correlation_matrix(const), np.eye(2))


def test_correlation_mse():
    # [[1,1],[1,1]] vs [[1,-1],[-1,1]]: squared differences 0,4,4,0 -> mean 2
    a = np.array([1.0, 2, 3, 4])
    assert cm.correlation_mse(np.stack([a, 2 * a], 1), np.stack([a, -a], 1)) == pytest.approx(2.0)
    assert cm.correlation_mse(np.stack([a, 2 * a], 1), np.stack([a, 3 * a + 1], 1)) == pytest.approx(0.0)


def test_nearest_neighbours(tiny_chunks):
    # pool: 3x3 grid, point (i, j) has index 3i + j.
    # query (0.1, 0): (0,0) idx 0 at 0.1, (1,0) idx 3 at 0.9, (0,1) idx 1 at sqrt(0.01 + 1)
    # query (2, 2): itself idx 8 at 0, then (1,2) idx 5 and (2,1) idx 7 at 1
    pool = np.array([[i, j] for i in range(3) for j in range(3)], float)
    idx, dist = cm.nearest_neighbours(np.array([[0.1, 0.0], [2.0, 2.0]]), pool, k=3)
    assert idx.shape == dist.shape == (2, 3)
    np.testing.assert_array_equal(idx[0], [0, 3, 1])
    np.testing.assert_allclose(dist[0], [0.1, 0.9, math.sqrt(1.01)])
    assert idx[1, 0] == 8 and set(idx[1, 1:]) == {5, 7}
    np.testing.assert_allclose(dist[1], [0, 1, 1], atol=1e-12)
    # a copy of a pool shower far from the origin is at distance exactly 0 (memorisation
    # check), and its neighbours' distances are exact, not |q|^2 - 2 q.p + |p|^2 rounding
    far = 1e3 + np.random.default_rng(0).random((20, 50))
    i, d = cm.nearest_neighbours(far[4:5], far, k=2)
    assert i[0, 0] == 4 and d[0, 0] == 0.0
    assert d[0, 1] == np.sqrt(((far[4] - far[i[0, 1]]) ** 2).sum())
    with pytest.raises(ValueError):
        cm.nearest_neighbours(pool, pool, k=10)


# ------------------------------------------------------------------ LHCb observables

def lhcb_image(*cells, n=1):
    img = np.zeros((n, 30, 30))
    for iy, ix, e in cells:   # image index [i_y, i_x], cell centre x = i_x - 14.5
        img[:, iy, ix] = e
    return img


P0 = np.zeros((1, 3))


def test_lhcb_centre():
    # (0.5, -1) + 25 * (1, 2) / 50 = (1.0, 0.0)
    np.testing.assert_allclose(cm.lhcb_centre(np.array([[1.0, 2.0, 50.0]]), np.array([[0.5, -1.0, 7.0]])),
                               [[1.0, 0.0]])


def test_lhcb_asymmetry_sides_and_sign():
    px, mx, py = np.array([[1.0, 0, 100]]), np.array([[-1.0, 0, 100]]), np.array([[0, 1.0, 100]])
    # all energy at x = 20 - 14.5 = 5.5, y = 0.5; centre (+-0.25, 0)
    img = lhcb_image((15, 20, 1.0))
    assert cm.lhcb_asymmetry(img, px, P0) == pytest.approx(1.0)    # ahead of +x
    assert cm.lhcb_asymmetry(img, mx, P0) == pytest.approx(-1.0)   # behind when p flips
    # transverse: y = 0.5 is left of +x (+1), right of -x (-1)
    assert cm.lhcb_asymmetry(img, px, P0, orthogonal=True) == pytest.approx(1.0)
    assert cm.lhcb_asymmetry(img, mx, P0, orthogonal=True) == pytest.approx(-1.0)
    # axes: energy at x = 10 - 14.5 = -4.5, y = 20 - 14.5 = 5.5: behind along +x, ahead along +y
    img2 = lhcb_image((20, 10, 1.0))
    assert cm.lhcb_asymmetry(img2, px, P0) == pytest.approx(-1.0)
    assert cm.lhcb_asymmetry(img2, py, P0) == pytest.approx(1.0)
    # the split line goes through the centre: point x = 10 -> centre 10.25, x = 5.5 is behind
    assert cm.lhcb_asymmetry(img, px, np.array([[10.0, 0, 0]])) == pytest.approx(-1.0)
    # a cell on the split line counts on side 1 (MLHEP): point x = 5.25 -> centre x = 5.5
    assert cm.lhcb_asymmetry(img, px, np.array([[5.25, 0, 0]])) == pytest.approx(1.0)
    # 3 ahead, 1 behind: (3 - 1) / 4 = 0.5; empty image -> 0
    imgs = np.concatenate([lhcb_image((15, 20, 3.0), (15, 5, 1.0)), np.zeros((1, 30, 30))])
    np.testing.assert_allclose(cm.lhcb_asymmetry(imgs, np.repeat(px, 2, 0), np.zeros((2, 3))), [0.5, 0.0])


def test_lhcb_width(tiny_chunks):
    # equal energy at x = -4.5 and x = 5.5 (same row): std along x = 5, across 0
    img = lhcb_image((15, 10, 1.0), (15, 20, 1.0), n=3)
    p = np.array([[1.0, 0, 100], [0, 1.0, 100], [1.0, 1.0, 100]])
    pt = np.zeros((3, 3))
    # along (1,0): 5; along (0,1): 0; along (1,1)/sqrt2: x/sqrt2 -> 5/sqrt2, and across too
    np.testing.assert_allclose(cm.lhcb_width(img, p, pt), [5, 0, 5 / math.sqrt(2)], atol=1e-12)
    np.testing.assert_allclose(cm.lhcb_width(img, p, pt, orthogonal=True), [0, 5, 5 / math.sqrt(2)], atol=1e-12)
    assert cm.lhcb_width(np.zeros((1, 30, 30)), p[:1], pt[:1])[0] == 0.0
    # equal energy at (-4.5, -4.5) and (5.5, 5.5): 10 sqrt2 apart on the diagonal -> std 5 sqrt2
    # along p = (1,1), 0 across; along x: 5
    diag = lhcb_image((10, 10, 1.0), (20, 20, 1.0), n=2)
    np.testing.assert_allclose(cm.lhcb_width(diag, p[[2, 0]], pt[:2]), [5 * math.sqrt(2), 5], atol=1e-12)
    np.testing.assert_allclose(cm.lhcb_width(diag, p[[2, 0]], pt[:2], orthogonal=True), [0, 5], atol=1e-12)


def test_lhcb_sparsity(tiny_chunks):
    # cells 8, 1, 1 (total 10) out of 900: alpha 0.1 -> E >= 1: 3 cells; 0.5 -> 1; 0.8 -> 8 >= 8: 1;
    # 0.81 -> 0; 1e-5 -> 3 (empty cells are below any positive threshold); empty image -> 0
    imgs = np.concatenate([lhcb_image((0, 0, 8.0), (3, 4, 1.0), (29, 29, 1.0)), np.zeros((1, 30, 30))])
    s = cm.lhcb_sparsity(imgs, alphas=np.array([0.1, 0.5, 0.8, 0.81, 1e-5]))
    np.testing.assert_allclose(s, [[3 / 900, 1 / 900, 1 / 900, 0, 3 / 900], [0] * 5])
    assert cm.lhcb_sparsity(imgs).shape == (2, 20)


# ------------------------------------------------------------------ clustering and PRD

def test_kmeans_finds_three_blobs():
    rng = np.random.default_rng(0)
    means = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = np.concatenate([m + 0.1 * rng.standard_normal((50, 2)) for m in means])
    labels, centres = cm.kmeans(x, 3, seed=1)
    blocks = labels.reshape(3, 50)
    assert all(len(set(b)) == 1 for b in blocks) and len(set(blocks[:, 0])) == 3
    np.testing.assert_allclose(centres[blocks[:, 0]], means, atol=0.1)
    with pytest.raises(ValueError):
        cm.kmeans(x[:2], 3)


def test_kmeans_lloyd_steps_converge():
    # 1000 evenly spaced points on [0, 1], k = 2: whatever the seeds, Lloyd steps move the
    # split s to 1/4 + s/2 -> 1/2, centres 1/4 and 3/4 (needs the centre updates to work)
    for seed in range(3):
        labels, centres = cm.kmeans(np.linspace(0, 1, 1000)[:, None], 2, n_iter=100, seed=seed)
        np.testing.assert_allclose(np.sort(centres[:, 0]), [0.25, 0.75], atol=0.01)
        assert np.bincount(labels).min() > 490


def test_prd_auc_by_hand():
    # L-shaped curve of identical histograms: precision min(s,1), recall min(1,1/s) -> area 1
    s = np.tan(np.linspace(1e-10, np.pi / 2 - 1e-10, 1001))
    assert cm.prd_auc(np.minimum(s, 1), np.minimum(1, 1 / s)) == pytest.approx(1.0, abs=1e-6)
    # points (p, r): (0,1), (.5,1), (1,.5), (1,0): area 0.5*1 + 0.5*(1 + 0.5)/2 = 0.875
    assert cm.prd_auc(np.array([0, 0.5, 1, 1]), np.array([1, 1, 0.5, 0])) == pytest.approx(0.875)


def test_prd_identical_disjoint_and_half():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 600, 5))
    # same distribution: cluster histograms nearly equal -> AUC near 1
    assert cm.prd_auc(*cm.prd(a, b, num_runs=3)) > 0.9
    assert cm.prd_auc(*cm.prd(a, a, num_runs=2)) == pytest.approx(1.0, abs=1e-6)
    # disjoint supports: every cluster is pure -> precision = recall = 0 -> AUC 0
    p, r = cm.prd(a, b + 100.0, num_runs=2)
    assert np.all(p == 0) and np.all(r == 0) and cm.prd_auc(p, r) == 0.0
    # half of ev far away: precision min(l, 0.5), recall min(1, 0.5/l) -> area 0.5*1 + 0 = 0.5
    half = np.concatenate([b[:300], b[300:] + 100.0])
    p, r = cm.prd(a, half, num_runs=3)
    assert p.max() == pytest.approx(0.5, abs=0.05)
    assert cm.prd_auc(p, r) == pytest.approx(0.5, abs=0.05)


# ------------------------------------------------------------------ distances between distributions

def test_quantile_jsd_identical_and_disjoint():
    rng = np.random.default_rng(0)
    ref = rng.exponential(size=1000)
    assert cm.quantile_jsd(ref, ref, 20) == pytest.approx(0.0, abs=1e-12)
    assert cm.quantile_jsd(ref, ref + 1000.0, 20) == pytest.approx(1.0)   # all above max(ref)
    assert cm.quantile_jsd(ref, -ref - 1.0, 20) == pytest.approx(1.0)     # all below min(ref)


def test_quantile_jsd_by_hand():
    # ref 0..99, 2 bins split at 49.5: p = (0, .5, .5, 0) with under/overflow; sample all in
    # the first bin: q = (0, 1, 0, 0); m = (0, .75, .25, 0)
    # JSD = 0.5 * [.5 log2(.5/.75) + .5 log2(.5/.25)] + 0.5 * [log2(1/.75)] = 0.31128
    ref = np.arange(100.0)
    expected = 0.5 * (0.5 * math.log2(2 / 3) + 0.5) + 0.5 * math.log2(4 / 3)
    assert cm.quantile_jsd(ref, [10, 20, 30, 40], 2) == pytest.approx(expected)
    assert expected == pytest.approx(0.31128, abs=1e-5)
    # a sample smaller than the number of bins is fine (the 10-point rule is about ref)
    assert 0.0 < cm.quantile_jsd(np.arange(1000.0), [1.0, 500.0, 999.0], 50) < 1.0
    with pytest.raises(ValueError):
        cm.quantile_jsd(np.arange(99.0), [1.0], 10)


def test_quantile_jsd_ties():
    # ref = 80 zeros + 20 ones, 5 bins: quantile edges 0,0,0,0,0.2,1 -> unique 0, 0.2, 1;
    # bins [0, .2) holds 0.8, [.2, 1] holds 0.2. Same mix -> 0.
    ref = np.repeat([0.0, 1.0], [80, 20])
    assert cm.quantile_jsd(ref, np.repeat([0.0, 1.0], [8, 2]), 5) == pytest.approx(0.0, abs=1e-12)
    # all ones: q = (0, 0, 1, 0), m = (0, .4, .6, 0):
    # JSD = 0.5 * [.8 log2 2 + .2 log2(1/3)] + 0.5 * log2(1/.6) = 0.60999
    expected = 0.5 * (0.8 - 0.2 * math.log2(3)) + 0.5 * math.log2(5 / 3)
    assert cm.quantile_jsd(ref, np.ones(10), 5) == pytest.approx(expected)
    assert expected == pytest.approx(0.60999, abs=1e-5)
    # constant reference: one bin holding that value
    assert cm.quantile_jsd(np.full(20, 5.0), [5.0, 5.0], 2) == 0.0
    assert cm.quantile_jsd(np.full(20, 5.0), [6.0], 2) == pytest.approx(1.0)
    assert cm.quantile_jsd(np.full(20, 5.0), [4.0], 2) == pytest.approx(1.0)


def test_separation_power():
    rng = np.random.default_rng(0)
    a = rng.standard_normal(1000)
    assert cm.separation_power(a, a) == pytest.approx(0.0)
    assert cm.separation_power(a, a + 100.0) == pytest.approx(1.0)
    # edges [0, .5, 1]: h1 = (.5, .5), h2 = (1, 0): 0.5 * (.25/1.5 + .25/.5) = 1/3
    assert cm.separation_power([0.25, 0.75], [0.25, 0.25], bins=[0, 0.5, 1]) == pytest.approx(1 / 3)


def exact_gaussian_sample(mean, cov, n=500, seed=0):
    """Points whose sample mean and (ddof=1) covariance are exactly `mean`, `cov`."""
    z = np.random.default_rng(seed).standard_normal((n, len(mean)))
    z -= z.mean(axis=0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T   # whiten: cov = I
    return z @ np.linalg.cholesky(np.asarray(cov, float)).T + mean


def test_frechet_distance():
    # means (0,0), (3,4): 25; diag(1,4) vs diag(4,1): tr = 5 + 5 - 2 * (sqrt4 + sqrt4) = 2 -> 27
    a = exact_gaussian_sample([0, 0], np.diag([1.0, 4.0]))
    b = exact_gaussian_sample([3, 4], np.diag([4.0, 1.0]), seed=1)
    assert cm.frechet_distance(a, b) == pytest.approx(27.0)
    # non-commuting: [[2,1],[1,2]] (eigenvalues 3, 1) vs I: 4 + 2 - 2 (sqrt3 + 1) = 4 - 2 sqrt3
    c = exact_gaussian_sample([1, 1], [[2.0, 1.0], [1.0, 2.0]])
    d = exact_gaussian_sample([1, 1], np.eye(2), seed=2)
    assert cm.frechet_distance(c, d) == pytest.approx(4 - 2 * math.sqrt(3))
    assert cm.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    # 1-D: [0, 2] (mean 1, var 2) vs [10, 14] (mean 12, var 8): 121 + 2 + 8 - 2*4 = 123
    assert cm.frechet_distance(np.array([0.0, 2.0]), np.array([10.0, 14.0])) == pytest.approx(123.0)


def test_standardised_frechet_by_hand():
    # real column 1 (0, 2): mean 1, std 1 -> (-1, 1); generated (1, 3) -> (0, 2): means 0 and 1, variances (ddof 1)
    # 2 and 2: 1 + 2 + 2 - 2 sqrt(2 x 2) = 1. The real row with NaN is left out; column 2 is constant (std 0 -> 1).
    real = np.array([[0.0, 5.0], [2.0, 5.0], [np.nan, 5.0]])
    assert cm.standardised_frechet(real, np.array([[1.0, 5.0], [3.0, 5.0]])) == pytest.approx(1.0)
    assert cm.standardised_frechet(real, real) == pytest.approx(0.0, abs=1e-12)


def test_binned_separation_by_hand():
    edges = np.array([0.0, 1.0, 2.0])
    # NaN and inf left out, 9 clipped into the last bin: h1 = (1/2, 1/2), h2 = (1, 0):
    # 0.5 (1/4 / (3/2) + 1/4 / (1/2)) = 1/3; floor: 2 occupied bins x (1/2 + 1/2) / 4 = 1/2
    assert cm.binned_separation([0.5, 9.0, np.nan, np.inf], [0.5, 0.5], edges) == pytest.approx((1 / 3, 0.5))
    # clip=False drops 9 (the challenge): h1 = h2 = (1, 0): 0; floor 1 bin x (1/1 + 1/2) / 4
    assert cm.binned_separation([0.5, 9.0], [0.5, 0.5], edges, clip=False) == pytest.approx((0.0, 0.375))
    assert all(math.isnan(v) for v in cm.binned_separation([1.0], [2.0], None))   # nothing to bin


def test_bce_score_by_hand():
    y = np.array([1.0, 0.0])
    assert cm.bce_score(y, np.array([0.5, 0.5])) == pytest.approx(math.log(2))   # -ln(1/2) for each
    # p = 1 for both: right (0) and certain-wrong (log 0 clamped at -100, as torch): (0 + 100) / 2
    assert cm.bce_score(y, np.array([1.0, 1.0])) == pytest.approx(50.0)


# ------------------------------------------------------------------ amplification

def test_amplification_grows_with_generated_size():
    # generated showers drawn from the truth distribution behave like truth subsets of their
    # own size: the equivalent size is about M and grows with M
    rng = np.random.default_rng(0)
    ref, pool, gen = rng.standard_normal(20000), rng.standard_normal(20000), rng.standard_normal(3000)
    small = cm.amplification(ref, pool, gen[:300], n_bins=20, seed=1)
    large = cm.amplification(ref, pool, gen, n_bins=20, seed=1)
    assert set(large) == {"truth_sizes", "truth_jsd", "gen_sizes", "gen_jsd", "equivalent_size"}
    assert large["truth_sizes"][-1] == 20000 and large["gen_sizes"][-1] == 3000
    assert len(large["truth_jsd"]) == len(large["truth_sizes"])
    assert large["truth_jsd"][0] > 10 * large["truth_jsd"][-1]
    assert large["gen_jsd"][-1] == pytest.approx(cm.quantile_jsd(ref, gen, 20))
    assert 300 / 4 < small["equivalent_size"] < 300 * 4
    assert 3000 / 4 < large["equivalent_size"] < 3000 * 4
    assert large["equivalent_size"] > 3 * small["equivalent_size"]


def test_crossing_size_loglog():
    # JSD 0.1 at 100 and 0.01 at 1000 (JSD ~ 1/n): target 10^-1.5 is crossed at 10^2.5 = 316.2
    # in log-log (a linear interpolation would give 700); never reached -> inf; reached at once -> None
    assert cm._crossing_size([10, 100, 1000], [0.5, 0.1, 0.01], 10 ** -1.5) == pytest.approx(10 ** 2.5)
    assert cm._crossing_size([10, 100], [0.5, 0.1], 0.01) == math.inf
    assert cm._crossing_size([10, 100], [0.5, 0.1], 0.6) is None


def test_amplification_limits():
    rng = np.random.default_rng(1)
    ref, pool = rng.standard_normal(2000), rng.standard_normal(2000)
    # generated = the reference itself: JSD 0, no truth subset reaches it -> inf
    assert cm.amplification(ref, pool, ref, n_bins=10)["equivalent_size"] == math.inf
    # given sizes are kept where they fit, and both curves end at the full sample
    r = cm.amplification(ref, pool, pool[:1000], n_bins=10, sizes=[50, 500, 5000], n_rep=2)
    np.testing.assert_array_equal(r["truth_sizes"], [50, 500, 2000])
    np.testing.assert_array_equal(r["gen_sizes"], [50, 500, 1000])
    # generated far off: worse than the smallest truth subset -> None
    assert cm.amplification(ref, pool, ref + 5.0, n_bins=10, sizes=[20, 200])["equivalent_size"] is None
