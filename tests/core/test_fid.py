"""FID: the Fréchet distance against closed forms and scipy, the network and its loading against pytorch-fid."""

import numpy as np
import pytest
import torch
from scipy import linalg

from oftsr.fid import (
    FID_WEIGHTS_FILE,
    InceptionFeatures,
    fid_from_features,
    frechet_distance,
    gaussian_stats,
    inception_network,
)
from oftsr.metrics import PerceptualWeightsMissing

pytestmark = pytest.mark.timeout(180)


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    f64 = {"dtype": torch.float64}
    mu_a, mu_b = torch.tensor([0.0, 1.0, -2.0], **f64), torch.tensor([1.0, 1.0, 0.5], **f64)
    sd_a, sd_b = torch.tensor([1.0, 2.0, 0.5], **f64), torch.tensor([3.0, 0.1, 0.5], **f64)
    expected = (mu_a - mu_b).square().sum() + (sd_a - sd_b).square().sum()
    got = frechet_distance(mu_a, torch.diag(sd_a**2), mu_b, torch.diag(sd_b**2))
    assert got == pytest.approx(float(expected), rel=1e-10)


def test_frechet_distance_matches_scipy_for_full_and_singular_covariances():
    g = torch.Generator().manual_seed(0)
    d = 40
    for n in (200, 12):  # 12 samples in 40 dimensions: singular covariances, as with 100 images and 2048 features
        a = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
        b = torch.randn(n, d, generator=g, dtype=torch.float64) * 0.7 + 0.3
        (mu_a, cov_a), (mu_b, cov_b) = gaussian_stats(a), gaussian_stats(b)
        root = linalg.sqrtm(cov_a.numpy() @ cov_b.numpy())
        reference = float(
            ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a.numpy()) + np.trace(cov_b.numpy()) - 2 * np.trace(root.real)
        )
        assert fid_from_features(a, b) == pytest.approx(reference, rel=1e-6, abs=1e-6)
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-6)
    assert fid_from_features(a, b) == pytest.approx(fid_from_features(b, a), rel=1e-9)


def test_fid_needs_two_rows_and_matching_dimensions():
    with pytest.raises(ValueError, match="at least 2"):
        gaussian_stats(torch.zeros(1, 8))
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(4), torch.eye(4))


@pytest.fixture(scope="module")
def published_layout_weights(tmp_path_factory):
    """A state dict in the layout of the published file, built by pytorch-fid's own network (random values)."""
    from pytorch_fid import inception as reference

    torch.manual_seed(0)
    net = reference._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = reference.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = reference.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = reference.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = reference.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = reference.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = reference.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = reference.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = reference.FIDInceptionE_1(1280)
    net.Mixed_7c = reference.FIDInceptionE_2(2048)
    for m in net.modules():  # BatchNorm statistics away from (0, 1), so that a wrong layer shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    home = tmp_path_factory.mktemp("torch_home")
    (home / "hub" / "checkpoints").mkdir(parents=True)
    path = home / "hub" / "checkpoints" / FID_WEIGHTS_FILE
    torch.save(net.state_dict(), path)
    return home, path, net


def test_our_network_computes_pytorch_fids_features_from_the_same_cached_file(published_layout_weights, monkeypatch):
    from pytorch_fid.inception import InceptionV3

    home, _, _ = published_layout_weights
    monkeypatch.setenv("TORCH_HOME", str(home))
    ours = InceptionFeatures()  # found in the torch hub cache, as an evaluation finds it
    reference = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()  # loads the same cached file
    x = torch.rand(2, 3, 299, 299) * 2 - 1  # at 299² neither resizes (they resize differently)
    with torch.no_grad():
        want = reference((x + 1) / 2)[0].flatten(1)  # pytorch-fid takes [0, 1]
        got = ours(x)
    assert got.shape == (2, 2048)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_resizing_is_antialiased_bicubic_to_299(published_layout_weights):
    _, path, _ = published_layout_weights
    ours = InceptionFeatures(path)
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    up = torch.nn.functional.interpolate(x, size=(299, 299), mode="bicubic", antialias=True)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ours(up))
        assert not torch.allclose(ours(x), ours(torch.nn.functional.interpolate(x, size=(299, 299))))


def test_missing_or_unusable_weights_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(PerceptualWeightsMissing, match=FID_WEIGHTS_FILE) as err:
        InceptionFeatures()
    assert str(tmp_path) in str(err.value)
    with torch.no_grad():
        assert InceptionFeatures(random_weights=True)(torch.zeros(1, 3, 32, 32)).shape == (1, 2048)
    truncated = tmp_path / "truncated.pth"
    torch.save(inception_network().state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:1000])
    with pytest.raises(PerceptualWeightsMissing, match=r"truncated\.pth cannot be read"):
        InceptionFeatures(truncated)
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(10, 2048)}, wrong)
    with pytest.raises(PerceptualWeightsMissing, match=r"wrong\.pth do not fit"):
        InceptionFeatures(wrong)
