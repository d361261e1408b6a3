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


class CountingNet(TinyCNN):
    """Appends the number of real images of each forward and the process id to $CAMGATE_TEST_COUNT (the dry
    forward at load, an all-zero image, is not counted): counts what a run really computes, and where."""

    def forward(self, x):
        import os

        real = int((x.flatten(1).abs().amax(1) > 0).sum())
        if real and os.environ.get("CAMGATE_TEST_COUNT"):
            with open(os.environ["CAMGATE_TEST_COUNT"], "a") as f:
                f.write(f"{real} {os.getpid()}\n")
        if real and os.environ.get("CAMGATE_TEST_SLOW"):  # seconds per batch: room to kill a run mid-way
            import time

            time.sleep(float(os.environ["CAMGATE_TEST_SLOW"]))
        return super().forward(x)


def counting_net(num_classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return CountingNet(num_classes)


def faint_net(num_classes: int = 3) -> nn.Module:
    """Heatmap values around 1e-9, below float16's smallest subnormal (6e-8)."""
    torch.manual_seed(0)
    net = TinyCNN(num_classes)
    with torch.no_grad():
        net.head.weight.mul_(1e-9)
    return net


class PairOut(nn.Module):
    def forward(self, x):
        return x, x.mean()


class TupleNet(TinyCNN):
    """A module (``pair``) that returns a tuple: not a target layer."""

    def __init__(self, num_classes: int = 3):
        super().__init__(num_classes)
        self.pair = PairOut()

    def forward(self, x):
        return self.head(self.pair(self.features(x))[0].mean((2, 3)))


def tuple_net(num_classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return TupleNet(num_classes)


def vit_patch14(num_classes: int = 3) -> nn.Module:
    """A small torchvision ViT with 14 px patches (56 px input -> a 4x4 grid)."""
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(image_size=56, patch_size=14, num_layers=2, num_heads=2, hidden_dim=32,
                            mlp_dim=64, num_classes=num_classes)
    torch.nn.init.normal_(vit.heads.head.weight, std=0.1)  # torchvision zero-initialises the head
    return vit


def dead_net(num_classes: int = 3) -> nn.Module:
    """A head of zeros: every score is 0, so every gradient and every Grad-CAM map is all zero."""
    torch.manual_seed(0)
    net = TinyCNN(num_classes)
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.zero_()
    return net


_TINY_PROBS: list[nn.Module] = []  # built on first call, like a vendor SDK loading its model once


def tiny_probs(x):
    """A vendor-style scoring function (``kind: callable``, ``output: probs``): a float32 (B, 3, H, W)
    batch in, class probabilities out as a numpy array; the model behind it is tiny_cnn."""
    import numpy as np

    if not _TINY_PROBS:
        with torch.random.fork_rng(devices=[]):  # tiny_cnn seeds the global generator
            _TINY_PROBS.append(tiny_cnn().eval())
    with torch.no_grad():
        return _TINY_PROBS[0](torch.as_tensor(np.asarray(x))).softmax(1).numpy()


class OomNet(TinyCNN):
    """Runs out of GPU memory (the error torch raises) for batches above $CAMGATE_TEST_OOM_ABOVE images,
    and for a very bright image at any batch size: an out-of-memory that cannot be made without a GPU."""

    def forward(self, x):
        import os

        above = int(os.environ.get("CAMGATE_TEST_OOM_ABOVE", "1000000"))
        if x.shape[0] > above or (x.mean((1, 2, 3)) > 0.5).any():
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {x.shape[0]} images")
        return super().forward(x)


def oom_net(num_classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return OomNet(num_classes)
