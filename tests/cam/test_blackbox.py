"""DE-CAM and RISE on real (tiny) computations: localisation on a model whose evidence is known,
exact forward-pass budgets, per-image seeding (batch-independent, bit-identical re-runs)."""
import pytest
import torch

from camgate.cam.blackbox import METHODS, decam, explain, random_search, rise
from camgate.cam.maps import CamBatch, minmax, upsample
from camgate.errors import ConfigError
from camgate.model.backends import CallableBackend, TorchBackend

pytestmark = pytest.mark.usefixtures("one_thread")  # many small ops: one torch thread


S = 32  # image side; the evidence is the top-right quadrant rows [0, 16), columns [16, 32)


def quadrant_model(x):
    """Class 0's logit grows with the texture energy of the top-right quadrant, nothing else.
    Texture, not mean brightness: both the blur fill and the zero fill remove it."""
    q = (x[:, :, :S // 2, S // 2:] ** 2).mean((1, 2, 3))
    return torch.stack([6 * (q - 0.5), torch.zeros_like(q)], 1)


def images(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 0.1 * torch.randn(n, 3, S, S, generator=g)
    x[:, :, :S // 2, S // 2:] = torch.randn(n, 3, S // 2, S // 2, generator=g)
    return x


def quadrant_share(maps):
    """Share of the display map's mass (min-max, bilinear to the input size) in the quadrant."""
    m = minmax(upsample(maps, (S, S)))
    return m[:, :S // 2, S // 2:].sum((1, 2)) / m.sum((1, 2))


@pytest.mark.parametrize("name,least", [("decam", 0.6), ("rise", 0.4)])
def test_map_mass_lies_on_the_evidence(name, least):
    b = CallableBackend(quadrant_model, 2)
    x = images()
    maps = METHODS[name](b, x, torch.zeros(4, dtype=torch.long), budget=512, seeds=[1, 2, 3, 4])
    assert b.calls == 512 * 4
    assert maps.dtype == torch.float32 and (maps >= 0).all()
    assert maps.shape == ((4, 7, 7) if name == "decam" else (4, S, S))
    share = quadrant_share(maps)
    # the quadrant is 25 % of the image: every image's map must put at least 0.6 (DE-CAM) / 0.4 (RISE,
    # whose binary masks make it noisier at this budget) of its mass there
    assert (share > least).all(), share


@pytest.mark.parametrize("fn", [decam, rise, random_search])
def test_seeded_per_image_and_exact_budget(fn):
    b = CallableBackend(quadrant_model, 2)
    x, t = images(5, seed=3), torch.zeros(5, dtype=torch.long)
    seeds = torch.tensor([11, 12, 13, 14, 15])
    budget = 100  # not a multiple of DE-CAM's population: the last generation is cut short
    full = fn(b, x, t, budget=budget, seeds=seeds)
    assert b.calls == budget * 5
    again = fn(b, x, t, budget=budget, seeds=seeds)
    assert torch.equal(full, again)  # bit-identical re-run
    perm = torch.tensor([3, 0, 4, 2, 1])
    shuffled = fn(b, x[perm], t[perm], budget=budget, seeds=seeds[perm])
    assert torch.equal(shuffled, full[perm])  # neighbours in the batch change nothing
    parts = torch.cat([fn(b, x[:2], t[:2], budget=budget, seeds=seeds[:2], max_batch=7),
                       fn(b, x[2:], t[2:], budget=budget, seeds=seeds[2:])])
    assert torch.equal(parts, full)  # nor do split batches and other chunk sizes
    other = fn(b, x, t, budget=budget, seeds=seeds + 1)
    assert not torch.equal(other, full)  # and the seed matters
    assert b.calls == budget * 5 * 5


def test_cnn_batch_independence_and_budget():
    """A real conv net as a black box: same maps whichever batch an image is evaluated in."""
    from zoo import tiny_cnn

    b = TorchBackend(tiny_cnn(3), "cpu")
    x = images(3, seed=5)
    t = torch.tensor([0, 2, 1])
    whole = decam(b, x, t, budget=64, seeds=[7, 8, 9])
    alone = torch.cat([decam(b, x[i:i + 1], t[i:i + 1], budget=64, seeds=[7 + i]) for i in range(3)])
    # conv kernels may group a batch differently: equal up to float rounding (selection could only
    # flip on an exact tie of two fitness values, which rounding at 1e-7 does not produce here)
    assert torch.allclose(whole, alone, atol=1e-5)
    assert b.calls == 64 * 6


def test_small_budgets_and_targets():
    b = CallableBackend(quadrant_model, 2)
    x = images(2)
    for budget in (1, 3, 16, 17):  # below, at and just above one population
        b.calls = 0
        m = decam(b, x, torch.tensor([0, 1]), budget=budget)
        assert b.calls == 2 * budget and torch.isfinite(m).all() and (m >= 0).all()
    b.calls = 0
    decam(b, x, torch.tensor([-1, 1]), budget=20)  # -1: the predicted class, one extra pass
    assert b.calls == 2 * 20 + 1
    with pytest.raises(ConfigError, match="budget"):
        rise(b, x, None, budget=0)
    with pytest.raises(ConfigError, match="out of range"):
        decam(b, x, torch.tensor([0, 5]), budget=8)
    with pytest.raises(ConfigError, match="seeds"):
        decam(b, x, None, budget=8, seeds=[1, 2, 3])
    with pytest.raises(ConfigError, match="fill"):
        rise(b, x, None, budget=8, fill="noise")


def test_explain_gives_a_cam_batch():
    b = CallableBackend(quadrant_model, 2)
    x = images(3)
    out = explain(b, x, "rise", targets=None, budget=32, seeds=[1, 2, 3])
    assert isinstance(out, CamBatch) and out.cams.shape == (3, S, S)
    assert torch.allclose(out.logits.softmax(1), b.probs(x), atol=1e-6)
    assert torch.equal(out.targets, out.logits.argmax(1))
    assert b.calls == 3 + 3 * 32 + 3  # clean pass + budget (+ the check's own pass above)


def test_bookkeeping_is_recorded():
    b = CallableBackend(quadrant_model, 2)
    st = {}
    decam(b, images(2), None, budget=64, stats=st)
    assert st["evaluations"] == 128 and 0 <= st["bookkeeping_share"] <= 1
    assert st["best"].shape == (2, 7, 7)
