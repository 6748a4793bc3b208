"""Fréchet Inception Distance (FID) between two sets of images (DESIGN section 8).

``FID = |mu_a - mu_b|² + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` between Gaussians fitted to pool3 features
``(N, 2048)`` of the 2015 TensorFlow Inception network, the network every published FID uses. Its weights are
the PyTorch port that pytorch-fid publishes (``pt_inception-2015-12-05-6726825d.pth``), looked up in the torch hub
cache (``$TORCH_HOME/hub/checkpoints``) like the LPIPS backbone; they are never fetched during an evaluation, and
when they are absent :class:`~oftsr.metrics.PerceptualWeightsMissing` names the file.

Images ``(B, 3, H, W)`` in [-1, 1] are resized to 299² with antialiased bicubic interpolation (clean-fid's
choice, instead of the legacy bilinear resize that aliases when images are shrunk). The network differs from
torchvision's Inception-v3 only in its pooling: the average pools of the mixed blocks leave the zero padding out
of the average, and the last block max-pools, as the TensorFlow graph does.

The trace term uses ``tr((S_a S_b)^(1/2)) = sum sqrt(eig(R S_b R))`` with ``R = S_a^(1/2)``: symmetric
eigen-decompositions in float64 only, stable for the singular covariances of fewer than 2,048 images.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from oftsr.metrics import PerceptualWeightsMissing, hub_checkpoint
from oftsr.nets.weights import read_state_dict

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_FILE}"
INPUT_SIZE = 299
# torchvision's Inception3 layers from the input to the pool3 features, in order
POOL3_LAYERS = (
    *("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3", "maxpool2"),
    *("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"),
    *("Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool"),
)


def frechet_distance(mu_a: torch.Tensor, cov_a: torch.Tensor, mu_b: torch.Tensor, cov_b: torch.Tensor) -> float:
    """Fréchet distance between ``N(mu_a, cov_a)`` and ``N(mu_b, cov_b)``; means ``(D,)``, covariances ``(D, D)``."""
    mu_a, mu_b, cov_a, cov_b = (v.double() for v in (mu_a, mu_b, cov_a, cov_b))
    if mu_a.shape != mu_b.shape or cov_a.shape != cov_b.shape or cov_a.shape != (*mu_a.shape, *mu_a.shape):
        raise ValueError(f"shapes do not match: means {tuple(mu_a.shape)}, covariances {tuple(cov_a.shape)}")
    root_a = _psd_sqrt(cov_a)
    cross = torch.linalg.eigvalsh(_symmetric(root_a @ cov_b @ root_a)).clamp(min=0).sqrt().sum()
    value = (mu_a - mu_b).square().sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross
    return float(value.clamp(min=0))


def _symmetric(m: torch.Tensor) -> torch.Tensor:
    return (m + m.T) / 2


def _psd_sqrt(m: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(_symmetric(m))
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` (float64) of features ``(N, D)``, N >= 2."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 feature rows (N, D), got {tuple(features.shape)}")
    f = features.double()
    return f.mean(dim=0), torch.cov(f.T)


def fid_from_features(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID between two feature sets ``(N, D)`` and ``(M, D)``."""
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


# --- the TensorFlow Inception network on torchvision's modules -------------------------------------------------


def _pool(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "max":
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _blocks():
    from torchvision.models import inception as tv  # imported here: torchvision is only needed for FID

    class MixedA(tv.InceptionA):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b5 = self.branch5x5_2(self.branch5x5_1(x))
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_pool(x, "avg"))], 1)

    class MixedC(tv.InceptionC):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            d = x
            for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4):
                d = conv(d)
            return torch.cat([self.branch1x1(x), b7, self.branch7x7dbl_5(d), self.branch_pool(_pool(x, "avg"))], 1)

    class MixedE(tv.InceptionE):
        pool = "avg"  # the last block of the network max-pools

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            s = self.branch3x3_1(x)
            d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            return torch.cat(
                [
                    self.branch1x1(x),
                    self.branch3x3_2a(s),
                    self.branch3x3_2b(s),
                    self.branch3x3dbl_3a(d),
                    self.branch3x3dbl_3b(d),
                    self.branch_pool(_pool(x, self.pool)),
                ],
                1,
            )

    return tv, MixedA, MixedC, MixedE


def inception_network() -> nn.Module:
    """The FID Inception network, randomly initialised; its state-dict keys are those of the published file."""
    tv, mixed_a, mixed_c, mixed_e = _blocks()
    blocks = [tv.BasicConv2d, mixed_a, tv.InceptionB, mixed_c, tv.InceptionD, mixed_e, tv.InceptionAux]
    net = tv.Inception3(num_classes=1008, aux_logits=False, init_weights=False, inception_blocks=blocks)
    net.Mixed_7c.pool = "max"
    return net


def weights_path() -> Path:
    """Where torch hub keeps the FID Inception weights."""
    return hub_checkpoint(FID_WEIGHTS_FILE)


class InceptionFeatures(nn.Module):
    """Pool3 features ``(B, 2048)`` of images ``(B, 3, H, W)`` in [-1, 1].

    Args:
        weights: a state-dict file; default the torch hub cache's ``pt_inception-2015-12-05-6726825d.pth``.
        download: fetch the published file into the hub cache when it is missing (never during an evaluation).
        random_weights: an untrained network (to try the plumbing: the numbers are not FID).
    """

    def __init__(self, weights: str | Path | None = None, *, download: bool = False, random_weights: bool = False):
        super().__init__()
        self.net = inception_network()
        if not random_weights:
            path = Path(weights) if weights is not None else weights_path()
            if not path.is_file():
                if not download or weights is not None:
                    raise PerceptualWeightsMissing(
                        f"FID Inception weights not found at {path}; copy {FID_WEIGHTS_FILE} ({FID_WEIGHTS_URL}) "
                        f"there (TORCH_HOME={os.environ.get('TORCH_HOME', '<unset>')}) or evaluate without FID"
                    )
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    torch.hub.download_url_to_file(FID_WEIGHTS_URL, str(path), progress=False)
                except OSError as err:
                    raise PerceptualWeightsMissing(f"could not fetch {FID_WEIGHTS_URL} to {path}: {err}") from err
            self._load(path)
        self.net.eval().requires_grad_(False)

    def _load(self, path: Path) -> None:
        try:
            state = read_state_dict(path)  # weights only: never an arbitrary pickle
        except ValueError as err:  # truncated file, not a torch file, no state dict
            raise PerceptualWeightsMissing(f"FID Inception weights at {path} cannot be read: {err}") from err
        try:
            self.net.load_state_dict(state)
        except RuntimeError as err:
            raise PerceptualWeightsMissing(f"FID Inception weights at {path} do not fit the network: {err}") from err

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic", antialias=True, align_corners=False)
        for name in POOL3_LAYERS:
            x = getattr(self.net, name)(x)
        return x.flatten(1)


__all__ = [
    "FID_WEIGHTS_FILE",
    "FID_WEIGHTS_URL",
    "InceptionFeatures",
    "fid_from_features",
    "frechet_distance",
    "gaussian_stats",
    "inception_network",
    "weights_path",
]
