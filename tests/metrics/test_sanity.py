"""Sanity checks (model-parameter randomisation, random logit) against scipy, skimage and Quantus."""
import numpy as np
import pytest
import scipy.stats
import skimage.metrics
import torch
import torch.nn.functional as F

from camgate.metrics.sanity import (cam_explainer, other_classes, randomisable, random_logit_similarity,
                                    randomisation_similarity, spearman, ssim)
from zoo import tiny_cnn

pytestmark = pytest.mark.usefixtures("one_thread")

quantus = pytest.importorskip("quantus")


def tied_maps(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 5, shape, generator=g).float()  # few values: many ties
    b = (a + 3 * torch.rand(shape, generator=g)).round()
    return a, b


def edge_map(model, x, targets):
    """An explainer that ignores the model and the class: Sobel magnitude of the grey image."""
    grey = x.mean(1, keepdim=True)
    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]]).view(1, 1, 3, 3)
    gx, gy = F.conv2d(grey, kx, padding=1), F.conv2d(grey, kx.transpose(2, 3), padding=1)
    return (gx.square() + gy.square()).sqrt()[:, 0]


@pytest.fixture
def setup():
    torch.manual_seed(1)
    x = torch.rand(4, 3, 32, 32)
    model = tiny_cnn(3).eval()
    return model, [model.features[2]], x


def test_spearman_matches_scipy_and_quantus():
    a, b = tied_maps((5, 12, 12))
    ours = spearman(a, b).numpy()
    ref = [scipy.stats.spearmanr(aa.ravel(), bb.ravel())[0] for aa, bb in zip(a.numpy(), b.numpy())]
    q = quantus.functions.similarity_func.correlation_spearman(a.flatten(1).numpy(), b.flatten(1).numpy(),
                                                                batched=True)
    np.testing.assert_allclose(ours, ref, atol=1e-12)
    np.testing.assert_allclose(ours, q, atol=1e-12)


@pytest.mark.parametrize("flat", [False, True])
def test_ssim_matches_skimage_and_quantus(flat):
    a, b = tied_maps((5, 12, 12), seed=1)
    if flat:  # Quantus' RandomLogit hands ssim the flattened maps: 1-D SSIM
        a, b = a.flatten(1), b.flatten(1)
    ours = ssim(a, b).numpy()
    q = quantus.functions.similarity_func.ssim(a.numpy(), b.numpy(), batched=True)
    np.testing.assert_allclose(ours, q, atol=1e-6)  # skimage keeps float32 input in float32
    a64, b64 = a.double().numpy(), b.double().numpy()
    ref = [skimage.metrics.structural_similarity(aa, bb, data_range=2.0) for aa, bb in zip(a64, b64)]
    np.testing.assert_allclose(ssim(a, b, data_range=2.0).numpy(), ref, atol=1e-12)


def test_gradcam_fails_less_than_edge_map(setup, capsys):
    model, layers, x = setup
    cam = randomisation_similarity(model, layers, x, seed=0)
    edge = randomisation_similarity(model, layers, x, seed=0, explain=edge_map)
    cam_rl = random_logit_similarity(model, layers, x, num_classes=3, seed=0)
    edge_rl = random_logit_similarity(model, layers, x, num_classes=3, seed=0, explain=edge_map)
    with capsys.disabled():
        for k in cam:
            print(f"\nMPRT {k}: gradcam spearman {cam[k]['spearman'].mean():.3f} ssim {cam[k]['ssim'].mean():.3f}"
                  f" | edge spearman {edge[k]['spearman'].mean():.3f}")
        print(f"random logit: gradcam spearman {cam_rl['spearman'].mean():.3f} ssim {cam_rl['ssim'].mean():.3f}"
              f" | edge spearman {edge_rl['spearman'].mean():.3f}")
    assert list(cam) == ["1:head", "2:features.2", "3:features.0"]
    for k in cam:
        for name in ("spearman", "ssim"):
            torch.testing.assert_close(edge[k][name], torch.ones(4, dtype=torch.float64))
    assert cam["3:features.0"]["spearman"].mean() < 0.9
    for name in ("spearman", "ssim"):
        torch.testing.assert_close(edge_rl[name], torch.ones(4, dtype=torch.float64))
    assert cam_rl["spearman"].mean() < 0.9


def test_caller_model_and_rng_untouched(setup):
    model, layers, x = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    rng = torch.get_rng_state()
    randomisation_similarity(model, layers, x, seed=3, order="top_down")
    randomisation_similarity(model, layers, x, seed=3, order="independent", depths=[2])
    random_logit_similarity(model, layers, x, num_classes=3, seed=3)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert [p.requires_grad for p in model.parameters()] == flags
    assert torch.equal(torch.get_rng_state(), rng)


def test_seeded(setup):
    model, layers, x = setup
    r1 = randomisation_similarity(model, layers, x, seed=5)
    r2 = randomisation_similarity(model, layers, x, seed=5)
    r3 = randomisation_similarity(model, layers, x, seed=6)
    for k in r1:
        torch.testing.assert_close(r1[k], r2[k], rtol=0, atol=0)
    assert not torch.equal(r1["3:features.0"]["spearman"], r3["3:features.0"]["spearman"])
    l1 = random_logit_similarity(model, layers, x, num_classes=3, seed=5)
    l2 = random_logit_similarity(model, layers, x, num_classes=3, seed=5)
    torch.testing.assert_close(l1, l2, rtol=0, atol=0)


def test_other_classes():
    t = torch.arange(10) % 5
    o = other_classes(t, 5, seed=2)
    assert (o != t).all() and ((0 <= o) & (o < 5)).all()
    torch.testing.assert_close(other_classes(t[3:], 5, seed=2, rows=range(3, 10)), o[3:])  # independent of batching
    draws = other_classes(torch.zeros(2000, dtype=torch.long), 4, seed=0)
    counts = torch.bincount(draws, minlength=4)
    assert counts[0] == 0 and (counts[1:] > 550).all()  # uniform over the others


def _quantus_explain(model, layers):
    ours = cam_explainer(model, layers)

    def explain(model, inputs, targets, **kwargs):
        return ours(model, torch.as_tensor(inputs), torch.as_tensor(targets))[:, None].numpy()

    return explain


def test_matches_quantus_mprt(setup):
    model, layers, x = setup
    y = model(x).argmax(1)
    explain = _quantus_explain(model, layers)
    a = explain(model, x.numpy(), y.numpy())
    n = len(randomisable(model))
    ours = randomisation_similarity(model, layers, x, y, seed=0, depths=range(1, n + 1))
    metric = quantus.MPRT(layer_order="top_down", seed=0, normalise=False, abs=False, disable_warnings=True,
                          display_progressbar=False)
    q = metric(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=a, explain_func=explain,
               device="cpu", batch_size=len(x))
    assert [k.split(":", 1)[1] for k in ours] == [k for k in q if k != "original"]
    for k in ours:
        assert np.isfinite(q[k.split(":", 1)[1]]).all()
        np.testing.assert_allclose(ours[k]["spearman"].numpy(), q[k.split(":", 1)[1]], atol=1e-6)


def test_matches_quantus_random_logit(setup):
    model, layers, x = setup
    y = model(x).argmax(1)
    explain = _quantus_explain(model, layers)
    a = explain(model, x.numpy(), y.numpy())
    # Quantus' draw of the other classes (one numpy seed per batch)
    np.random.seed(7)
    classes = np.stack([np.arange(3)] * len(x))
    mask = np.ones_like(classes)
    mask[np.arange(len(x))[None, :], y.numpy()] = 0
    idx = np.random.randint(0, 2, len(x))
    off = torch.as_tensor(classes[mask.astype(bool)].reshape(len(x), -1)[np.arange(len(x))[None, :], idx].ravel())
    ours = random_logit_similarity(model, layers, x, y, num_classes=3, others=off)
    kw = dict(num_classes=3, seed=7, normalise=False, abs=False, disable_warnings=True, display_progressbar=False)
    q_sp = quantus.RandomLogit(similarity_func=quantus.functions.similarity_func.correlation_spearman, **kw)(
        model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=a, explain_func=explain, device="cpu")
    assert np.isfinite(q_sp).all()
    np.testing.assert_allclose(ours["spearman"].numpy(), q_sp, atol=1e-6)
    # Quantus' default similarity: SSIM of the flattened maps (1-D); ours["ssim"] is the 2-D SSIM
    q_ssim = quantus.RandomLogit(**kw)(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=a,
                                       explain_func=explain, device="cpu")
    b = torch.as_tensor(explain(model, x.numpy(), off.numpy()))
    np.testing.assert_allclose(ssim(torch.as_tensor(a).flatten(1), b.flatten(1)).numpy(), q_ssim, atol=1e-6)
