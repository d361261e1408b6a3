"""``camgate road --sanity``: the sanity checks as columns of the faithfulness file, and the policy's
``sanity`` rule deciding ``trusted`` with ROAD's."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from helpers import make_set, zoo_card
from zoo import sobel_map

from camgate.cam.methods import NATIVE
from camgate.cli import main
from camgate.data.batches import iter_batches
from camgate.data.decode import MaskSpec
from camgate.data.manifest import load_items
from camgate.gating.decision import gate
from camgate.io import results
from camgate.report import artifacts
from camgate.metrics.sanity import SANITY_COLUMNS, randomisable, randomisation_similarity, random_logit_similarity
from camgate.model.load import load_model
from camgate.runner import run_road

SANITY = {"max_randomised_similarity": 0.5, "max_random_logit_similarity": 0.5}


def _policy(path, **rules):
    path.write_text(yaml.safe_dump({"rules": {"no_activation_rate": None, **rules}}))
    return str(path)


def test_columns_equal_the_library_on_the_same_maps(tmp_path):
    """Each ok row's similarities are those of the library functions (which equal Quantus' MPRT at the
    last cascade step and RandomLogit) on the same images, targets, seed and rows."""
    card, manifest = make_set(tmp_path, n=6)  # resnet18 at 64 px, target layer layer3, random weights
    lm = load_model(card, device="cpu")
    out = str(tmp_path / "road.parquet")
    run_road(lm, manifest, out, sanity=True, seed=3, progress=False)
    t = pq.read_table(out)
    assert set(SANITY_COLUMNS) <= set(t.column_names)
    rows = t.to_pylist()
    assert [r["status"] for r in rows] == ["ok"] * 6
    md = results.run_metadata(t)
    assert md["sanity"]["modules_randomised"] == len(randomisable(lm.model)) and md["sanity"]["seed"] == 3
    assert results.file_identity(md)["road"]["sanity"] is True
    batch = next(iter(iter_batches(load_items(manifest), lm.input, MaskSpec(), 6, with_masks=False)))
    x = torch.stack([s.x for s in batch])
    targets = torch.tensor([r["target_class"] for r in rows])
    n = len(randomisable(lm.model))
    lib = next(iter(randomisation_similarity(lm.model, lm.layers(), x, targets, seed=3, depths=[n]).values()))
    others = torch.tensor([r["random_logit_class"] for r in rows])
    assert (others != targets).all()
    logit = random_logit_similarity(lm.model, lm.layers(), x, targets, num_classes=3, seed=3,
                                    rows=[r["row"] for r in rows])
    got = {c: np.array([r[c] for r in rows], dtype=float) for c in SANITY_COLUMNS}
    for name, ref in (("randomised", lib), ("random_logit", logit)):
        want = ref["spearman"].numpy()
        # the one stated difference: a constant other map is similarity 0 here, NaN in Spearman's formula
        want = np.where(np.isnan(want), 0.0, want)
        np.testing.assert_allclose(got[f"{name}_spearman"], want, atol=1e-6)
        np.testing.assert_allclose(got[f"{name}_ssim"], ref["ssim"].numpy(), atol=1e-6)
    print({c: got[c].round(3).tolist() for c in SANITY_COLUMNS})
    # seeded: the same file again
    again = str(tmp_path / "again.parquet")
    run_road(lm, manifest, again, sanity=True, seed=3, progress=False)
    assert pq.read_table(again).select(list(SANITY_COLUMNS)).equals(t.select(list(SANITY_COLUMNS)))


def test_an_edge_map_fails_both_checks_and_the_verdict_is_not_trusted(tmp_path, monkeypatch, capsys):
    """A Sobel map of the image, offered as a method, does not depend on the model or the class: both
    similarities are 1, and the gate says the heatmaps are not trusted, naming why. Grad-CAM of the
    same model at its last conv layer changes under both."""
    monkeypatch.setitem(NATIVE, "sobel", (sobel_map, False))
    _, manifest = make_set(tmp_path, n=5)
    figures = {}
    for method, layer in (("sobel", "tap"), ("gradcam", "model.features.2")):
        (tmp_path / method).mkdir()
        card = zoo_card(tmp_path / method, "tapped_tiny_cnn", target_layer=layer)
        res, road = str(tmp_path / f"{method}.parquet"), str(tmp_path / f"{method}-road.parquet")
        args = ["--model", card, "--data", manifest, "--method", method, "--quiet"]
        assert main(["run", *args, "--out", res]) == 0
        assert main(["road", *args, "--out", road, "--sanity"]) == 0
        t = pq.read_table(road).to_pandas()
        figures[method] = t[["randomised_spearman", "randomised_ssim", "random_logit_spearman"]].mean().round(4)
        d = gate(res, _policy(tmp_path / "p.yaml", sanity=SANITY), road=road).to_dict()
        verdicts = {r["rule"]: r for r in d["rules"] if r["rule"] in ("randomised_similarity",
                                                                     "random_logit_similarity")}
        if method == "sobel":
            np.testing.assert_allclose(t[["randomised_spearman", "randomised_ssim", "random_logit_spearman",
                                          "random_logit_ssim"]].to_numpy(), 1.0, atol=1e-9)
            assert d["trusted"] is False
            assert all(v["verdict"] == "fail" and v["value"] == pytest.approx(1.0) for v in verdicts.values())
            assert "fully randomised model's is 1.000 (not <= 0.5)" in d["trust_reason"]
            assert "do not show what the model uses" in d["trust_reason"]
            # the record says what was checked, on how many images, with the figures; the page shows them
            _, files = artifacts(res, _policy(tmp_path / "p.yaml", sanity=SANITY), road=road, images=False)
            rec = json.loads(files["record.json"])
            assert rec["sanity"]["images"] == 5 and rec["sanity"]["mean_randomised_spearman"] == pytest.approx(1.0)
            assert "re-initialised" in rec["sanity"]["checked"]["randomisation"]
            assert rec["verdict"]["trusted"] is False and rec["road"]["trusted"] is False
            page = files["summary.md"].decode()
            assert "Faithfulness of the heatmaps" in page and "mean spearman similarity to the fully" in page
            assert "Heatmaps NOT trusted" in page
            assert "randomised_similarity measure=spearman" in files["junit.xml"].decode()
        else:
            assert verdicts["randomised_similarity"]["value"] < 0.9, verdicts
    print(figures)


def test_policy_sanity_without_checks_in_the_file_is_not_trusted(tmp_path, capsys):
    card, manifest = make_set(tmp_path, n=3)
    res, road = str(tmp_path / "r.parquet"), str(tmp_path / "road.parquet")
    assert main(["run", "--model", card, "--data", manifest, "--out", res, "--quiet"]) == 0
    assert main(["road", "--model", card, "--data", manifest, "--out", road, "--quiet"]) == 0
    assert "randomised_spearman" not in pq.read_table(road).column_names
    policy = _policy(tmp_path / "p.yaml", faithfulness={"min_margin": -1}, sanity=SANITY)
    capsys.readouterr()
    main(["gate", res, "--policy", policy, "--road", road])
    d = json.loads(capsys.readouterr().out)
    assert d["trusted"] is False and "holds no sanity checks (camgate road --sanity" in d["trust_reason"]
    assert "ROAD's margin over a random map is" in d["trust_reason"]  # the passing rule is named too
    # without any faithfulness file
    main(["gate", res, "--policy", policy])
    d = json.loads(capsys.readouterr().out)
    assert d["trusted"] is False and "no ROAD results" in d["trust_reason"]


def test_sanity_takes_only_the_judged_maps(tmp_path, capsys):
    card, manifest = make_set(tmp_path, n=2)
    code = main(["road", "--model", card, "--data", manifest, "--out", str(tmp_path / "r.parquet"), "--sanity",
                 "--layers", "all", "--quiet"])
    assert code == 2 and "use layers 'final'" in capsys.readouterr().err
    assert not (tmp_path / "r.parquet").exists()
