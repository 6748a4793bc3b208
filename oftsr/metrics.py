"""Image quality metrics on ``(B, 3, H, W)`` images in [-1, 1] (DESIGN section 8). Each returns ``(B,)``.

* :func:`psnr`: on RGB mapped to [0, 1], no Y channel, no border crop.
* :func:`ssim`: Gaussian window (11, sigma 1.5), on RGB in [0, 1], averaged over channels.
* :class:`LPIPS`: the ``lpips`` package (AlexNet by default) on [-1, 1]. Its ImageNet backbone comes from the
  torch hub cache (``$TORCH_HOME/hub/checkpoints``) as the package loads it; when it is absent and cannot be
  fetched, :class:`PerceptualWeightsMissing` names the file and ``TORCH_HOME``. A random backbone only on request.
* :class:`STLPIPS`: the shift-tolerant LPIPS of ``stlpips-pytorch``, which ships its trained weights and so runs
  offline. Reported as ST-LPIPS, never as LPIPS.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from oftsr.conventions import to_unit

#: torchvision checkpoints the ``lpips`` package loads for each backbone.
BACKBONE_FILES: dict[str, str] = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}


def psnr(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-12, *, clamp: bool = True) -> torch.Tensor:
    """PSNR in dB per sample between images in [-1, 1], computed on [0, 1] after clamping (``clamp=False``: as
    given, as the official evaluation computes it)."""
    a = to_unit(x.float())
    b = to_unit(y.float())
    if clamp:
        a, b = a.clamp(0, 1), b.clamp(0, 1)
    mse = (a - b).square().flatten(1).mean(dim=1)
    return 10.0 * torch.log10(1.0 / (mse + eps))


def _gaussian_window(size: int, sigma: float, channels: int, device: torch.device) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-coords.square() / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """SSIM per sample (Wang et al. 2004, K1 = 0.01, K2 = 0.03, data range 1) on RGB in [0, 1], valid windows."""
    a = to_unit(x.float()).clamp(0, 1)
    b = to_unit(y.float()).clamp(0, 1)
    c = a.shape[1]
    if min(a.shape[-2:]) < window:
        raise ValueError(f"SSIM needs images of at least {window}x{window}, got {tuple(a.shape[-2:])}")
    w = _gaussian_window(window, sigma, c, a.device)
    mu_a, mu_b = F.conv2d(a, w, groups=c), F.conv2d(b, w, groups=c)
    var_a = F.conv2d(a * a, w, groups=c) - mu_a.square()
    var_b = F.conv2d(b * b, w, groups=c) - mu_b.square()
    cov = F.conv2d(a * b, w, groups=c) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a.square() + mu_b.square() + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(dim=1)


class PerceptualWeightsMissing(RuntimeError):
    """A perceptual metric's pretrained weights are not on this machine and could not be fetched."""


def hub_checkpoint(name: str) -> Path:
    """Where torch hub keeps (or would download) the checkpoint file ``name``: ``$TORCH_HOME/hub/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def backbone_path(net: str = "alex") -> Path:
    """Where torch hub keeps the ImageNet backbone that LPIPS(``net``) loads."""
    return hub_checkpoint(BACKBONE_FILES[net])


class LPIPS(nn.Module):
    """LPIPS distance per sample ``(B,)`` for images in [-1, 1] (``lpips`` package, linear layers v0.1).

    Args:
        net: ``"alex"`` (the paper's protocol), ``"vgg"`` or ``"squeeze"``.
        random_backbone: use an untrained backbone (tests only: the numbers are not LPIPS).
        download: allow torch hub to fetch a missing backbone; when ``False`` a missing file raises at once.
    """

    def __init__(self, net: str = "alex", *, random_backbone: bool = False, download: bool = True):
        super().__init__()
        if net not in BACKBONE_FILES:
            raise ValueError(f"unknown LPIPS backbone {net!r}; expected one of {sorted(BACKBONE_FILES)}")
        import lpips  # imported here: it pulls in torchvision

        self.random_backbone = random_backbone
        path = backbone_path(net)
        if not random_backbone and not path.is_file() and not download:
            raise PerceptualWeightsMissing(self._missing(path))
        try:
            self.model = lpips.LPIPS(net=net, pnet_rand=random_backbone, verbose=False)
        except OSError as err:  # URLError, connection and file errors
            raise PerceptualWeightsMissing(f"{self._missing(path)} ({type(err).__name__}: {err})") from err
        self.model.eval().requires_grad_(False)

    @staticmethod
    def _missing(path: Path) -> str:
        return (
            f"LPIPS backbone weights not found at {path} and not downloadable; copy the torchvision file "
            f"{path.name} there (TORCH_HOME={os.environ.get('TORCH_HOME', '<unset>')}) or report ST-LPIPS instead"
        )

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model(x.float(), y.float()).flatten()


class STLPIPS(nn.Module):
    """Shift-tolerant LPIPS (``stlpips-pytorch``, weights shipped in the package) per sample, images in [-1, 1]."""

    def __init__(self, net: str = "alex"):
        super().__init__()
        if net not in ("alex", "vgg"):
            raise ValueError(f"ST-LPIPS backbone must be 'alex' or 'vgg', got {net!r}")
        import stlpips_pytorch.stlpips as st

        model = st.LPIPS(net=net, variant="shift_tolerant", pretrained=False, verbose=False)
        weights = Path(st.__file__).parent / "weights" / "vST0.0" / f"{net}_shift_tolerant.pth"
        if not weights.is_file():
            raise PerceptualWeightsMissing(f"ST-LPIPS weights missing: {weights}")
        state = torch.load(weights, map_location="cpu", weights_only=True)
        result = model.load_state_dict(state, strict=False)
        # ``lins.N`` are the same modules as ``linN`` registered twice; the file stores them once.
        missing = [k for k in result.missing_keys if not k.startswith("lins.")]
        if missing or result.unexpected_keys:
            raise PerceptualWeightsMissing(
                f"ST-LPIPS weights in {weights} do not fit: missing {missing[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}"
            )
        self.model = model.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model(x.float(), y.float()).flatten()
