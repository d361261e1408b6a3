"""Model factories the tests name in model cards as ``zoo:<factory>`` (``module:factory`` cards)."""
import torch
from torch import nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform


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


class RegionDetector(nn.Module):
    """torchvision's structure and output convention in miniature: its transform (normalise, pad to a
    multiple of 32), stride-4 conv features, and per region R_k one detection of class k at R_k's box
    whose score is sigmoid(gain * (mean over R_k of a fixed channel mix of the features - offset)):
    the score reads R_k and nothing else (or the region ``reads[k]``: a detection resting on context)."""

    def __init__(self, size, regions, gain=1.0, offset=0.0, seed=0, reads=None, labels=None):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.transform = GeneralizedRCNNTransform(min(size), max(size), [0.0] * 3, [1.0] * 3)
        self.features = nn.Sequential(nn.Conv2d(3, 6, 4, stride=4), nn.ReLU())
        with torch.no_grad():
            self.features[0].weight.copy_(torch.randn(6, 3, 4, 4, generator=g) * 0.2)
            self.features[0].bias.zero_()
        self.mix = nn.Parameter(torch.rand(6, generator=g) + 0.5)
        self.regions = torch.tensor(regions, dtype=torch.float32)  # (K, 4) xyxy, multiples of 4
        # where each score reads (default: its own box) and each detection's class (default: k)
        self.reads = self.regions if reads is None else torch.tensor(reads, dtype=torch.float32)
        self.labels = torch.arange(len(regions)) if labels is None else torch.tensor(labels)
        self.gain, self.offset = gain, offset

    def forward(self, images):
        images = list(images)
        sizes = [tuple(im.shape[-2:]) for im in images]
        il, _ = self.transform(images)
        v = (self.features(il.tensors) * self.mix[None, :, None, None]).sum(1)
        outs = []
        for i in range(len(images)):
            s = [v[i, int(y1) // 4:int(y2) // 4, int(x1) // 4:int(x2) // 4].mean() for x1, y1, x2, y2 in self.reads]
            outs.append({"boxes": self.regions.clone(), "labels": self.labels.clone(),
                         "scores": torch.sigmoid(self.gain * (torch.stack(s) - self.offset))})
        return self.transform.postprocess(outs, il.image_sizes, sizes)


DET_SIZE = (48, 64)  # (H, W) of the detectors below; boxes in these input pixels
DET_REGIONS = [[0, 0, 32, 24], [40, 24, 64, 48]]


def region_detector(num_classes: int = 3) -> nn.Module:
    """Two detections, classes 1 and 2, each scoring on its own box (torchvision convention: 0 = background)."""
    return RegionDetector(DET_SIZE, DET_REGIONS, labels=[1, 2])


def context_detector(num_classes: int = 3) -> nn.Module:
    """The same boxes, but each score reads the OTHER box: detections resting entirely on context."""
    return RegionDetector(DET_SIZE, DET_REGIONS, labels=[1, 2], reads=DET_REGIONS[::-1])


def broken_detector(num_classes: int = 3) -> nn.Module:
    """Returns boxes of the wrong shape: refused when the card is loaded."""

    class Broken(RegionDetector):
        def forward(self, images):
            return [{**o, "boxes": o["boxes"][:, :3]} for o in super().forward(images)]

    return Broken(DET_SIZE, DET_REGIONS, labels=[1, 2])


_CALLABLE = {}


def region_callable(x):
    """The region detector as a vendor function (a black box: model card kind callable)."""
    if "det" not in _CALLABLE:
        _CALLABLE["det"] = region_detector().eval()
    with torch.no_grad():
        return _CALLABLE["det"](x)


class InputTap(nn.Module):
    """A model with its input as a named layer (``tap``): what a map that ignores the model reads."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.tap = nn.Identity()
        self.model = model

    def forward(self, x):
        return self.model(self.tap(x))


def tapped_tiny_cnn(num_classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return InputTap(TinyCNN(num_classes))


def sobel_map(a: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
    """A native-method signature for an edge map of the activations (the image, at ``tap``): no gradient,
    no class, no weight enters it."""
    import torch.nn.functional as F

    gray = a.mean(1, keepdim=True)
    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]], device=a.device).view(1, 1, 3, 3)
    gx, gy = F.conv2d(gray, kx, padding=1), F.conv2d(gray, kx.transpose(2, 3), padding=1)
    return (gx.square() + gy.square()).sqrt()[:, 0]


def tapped_resnet18(num_classes: int = 4) -> nn.Module:
    """torchvision's resnet18 with its input as a layer (``tap``): the same state dict as resnet18."""
    from torchvision.models import ResNet, resnet18

    class TappedResNet(ResNet):
        def forward(self, x):
            return super().forward(self.tap(x))

    m = resnet18(weights=None, num_classes=num_classes)
    m.__class__ = TappedResNet
    m.tap = nn.Identity()
    return m

class RegionGate(nn.Module):
    """Multiplies the features by a fixed (C, h, w) gate: channel group k lives only in region R_k."""

    def __init__(self, gate):
        super().__init__()
        self.register_buffer("gate", gate)

    def forward(self, a):
        return a * self.gate


class RegionSegmenter(nn.Module):
    """A semantic segmentation model whose evidence is known: stride-4 conv features, channel group k
    gated to region R_k (``gate``, the target layer), and per-pixel scores (B, K, H, W) of class 0
    (background) = 0, class k = 1 + a fixed positive mix of group k inside R_k and -1 outside. So class k
    is predicted exactly on R_k and its scores read R_k and nothing else; classes beyond the regions
    score -2 everywhere (never predicted)."""

    def __init__(self, size, regions, num_classes=None, channels=3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        H, W = size
        n = len(regions)
        self.num_classes = num_classes or n + 1
        self.channels = channels
        self.features = nn.Sequential(nn.Conv2d(3, channels * n, 4, stride=4), nn.ReLU())
        with torch.no_grad():
            self.features[0].weight.copy_(torch.randn(channels * n, 3, 4, 4, generator=g) * 0.2)
            self.features[0].bias.fill_(0.05)
        inside = torch.zeros(n, H // 4, W // 4)
        for k, (x1, y1, x2, y2) in enumerate(regions):  # xyxy, multiples of 4
            inside[k, y1 // 4:y2 // 4, x1 // 4:x2 // 4] = 1
        self.register_buffer("inside", inside)
        self.gate = RegionGate(inside.repeat_interleave(channels, 0))
        self.mix = nn.Parameter(torch.rand(channels * n, generator=g) + 0.5)

    def forward(self, x):
        a = self.gate(self.features(x)) * self.mix[None, :, None, None]
        b, _, h, w = a.shape
        per = a.view(b, -1, self.channels, h, w).sum(2)  # (B, n, h, w)
        cls = torch.where(self.inside[None] > 0, 1 + per, -torch.ones_like(per))
        extra = torch.full((b, self.num_classes - 1 - per.shape[1], h, w), -2.0, device=x.device)
        scores = torch.cat([torch.zeros_like(per[:, :1]), cls, extra], 1)
        return nn.functional.interpolate(scores, scale_factor=4, mode="nearest")


SEG_SIZE = (48, 64)  # (H, W); regions xyxy in these pixels
SEG_REGIONS = [[0, 0, 32, 24], [40, 24, 64, 48]]


def region_segmenter(num_classes: int = 3) -> nn.Module:
    """Classes 1 and 2 on two regions (0 = background); ``num_classes`` > 3 adds never-predicted classes."""
    return RegionSegmenter(SEG_SIZE, SEG_REGIONS, num_classes)


def flat_segmenter(num_classes: int = 3) -> nn.Module:
    """A classifier's (B, K) output where a segmentation model's (B, K, H, W) is expected."""
    return TinyCNN(num_classes)


def segmenter_scores(x):
    """The region segmenter as a vendor function (kind callable, task segmentation): logits (B, K, H, W)."""
    if "seg" not in _CALLABLE:
        _CALLABLE["seg"] = region_segmenter(4).eval()
    with torch.no_grad():
        return _CALLABLE["seg"](torch.as_tensor(x))


def fixed_segmenter() -> nn.Module:
    """Three classes whatever the card says (no num_classes argument)."""
    return region_segmenter(3)


class DictSegmenter(RegionSegmenter):
    """torchvision's segmentation convention: a dict whose ``out`` holds the scores."""

    def forward(self, x):
        return {"out": super().forward(x)}


def dict_segmenter(num_classes: int = 3) -> nn.Module:
    return DictSegmenter(SEG_SIZE, SEG_REGIONS, num_classes)
