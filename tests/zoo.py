"""Model factories the tests name in model cards as ``zoo:<factory>`` (``module:factory`` cards)."""
import torch
from torch import nn


def efficientnet_lite0(num_classes: int = 1000) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes)


class TinyCNN(nn.Module):
    """Small enough for the slow pytorch-grad-cam methods (ScoreCAM runs one forward per channel)."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU())
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def tiny_cnn(num_classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return TinyCNN(num_classes)


class NaNNet(TinyCNN):
    """Produces NaN for very dark images: a model that fails on some inputs only."""

    def forward(self, x):
        out = super().forward(x)
        bad = x.mean((1, 2, 3)) < -0.5
        return torch.where(bad[:, None], torch.full_like(out, float("nan")), out)


def nan_net(num_classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return NaNNet(num_classes)


class PickyNet(TinyCNN):
    """Raises on very bright images: one input that breaks the forward pass of its whole batch."""

    def forward(self, x):
        if (x.mean((1, 2, 3)) > 0.5).any():
            raise RuntimeError("picky: cannot handle bright images")
        return super().forward(x)


def picky_net(num_classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return PickyNet(num_classes)
