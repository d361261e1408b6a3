"""`camgate layers`, `animate`, `road` and the gate's faithfulness rule, through the CLI."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from helpers import make_set, png, zoo_card

from camgate.cli import main
from camgate.io import results


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("camanim")
    _, manifest = make_set(root, n=4)
    return root, zoo_card(root, "tiny_cnn"), manifest


def test_layers_one_row_per_image_and_layer_equal_to_single_layer_runs(tiny, capsys):
    root, card, manifest = tiny
    out = str(root / "layers.parquet")
    assert main(["layers", "--model", card, "--data", manifest, "--out", out, "--quiet"]) == 0
    t = pq.read_table(out)
    md = results.run_metadata(t)
    assert md["layers"] == ["features.0", "features.1", "features.2", "features.3"]
    skipped = dict((s["layer"], s["reason"]) for s in md["skipped_layers"])
    assert "root module" in skipped[""] and "not a (B, C, h, w) map" in skipped["head"]
    assert "duplicate frame" in skipped["features"]
    assert t.num_rows == 4 * 4 and t.column("row").to_pylist() == [r for r in range(4) for _ in range(4)]
    assert all(0 <= v <= 1 for v in t.column("invalid_activation_ratio").to_pylist() if v is not None)
    # the one-pass map of a layer is the map a single-layer run of that layer stores
    single = str(root / "single.parquet")
    assert main(["run", "--model", card, "--data", manifest, "--out", single, "--target-layer", "features.2",
                 "--quiet"]) == 0
    one = pq.read_table(single).to_pylist()
    mine = [r for r in t.to_pylist() if r["layer"] == "features.2"]
    for a, b in zip(one, mine):
        np.testing.assert_allclose(results.cam_array(a), results.cam_array(b), rtol=1e-5, atol=1e-7)
        assert a["invalid_activation_ratio"] == pytest.approx(b["invalid_activation_ratio"], abs=1e-6)


def test_unknown_layer_is_a_usage_error_listing_candidates(tiny, capsys):
    root, card, manifest = tiny
    assert main(["layers", "--model", card, "--data", manifest, "--out", str(root / "x.parquet"),
                 "--layers", "features.9"]) == 2
    err = capsys.readouterr().err
    assert "unknown layer 'features.9'" in err and "features.2" in err


def test_animate_writes_video_gif_sheet_and_parquet(tiny, capsys):
    root, card, _ = tiny
    out = root / "anim"
    assert main(["animate", "--model", card, "--image", str(root / "images" / "001.png"),
                 "--mask", str(root / "masks" / "001.png"), "--out", str(out), "--fps", "4"]) == 0
    for name in ("layers.mp4", "layers.gif", "contact_sheet.png", "layers.parquet"):
        assert (out / name).stat().st_size > 0, name
    info = json.loads((out / "layers.json").read_text())
    assert info["layers"] == ["features.0", "features.1", "features.2", "features.3"] and info["norm"] == "both"
    assert pq.read_table(out / "layers.parquet").num_rows == 4


def test_road_scores_and_ybroad_summary(tiny, capsys):
    root, card, manifest = tiny
    out = str(root / "road.parquet")
    assert main(["road", "--model", card, "--data", manifest, "--out", out, "--quiet"]) == 0
    t = pq.read_table(out).to_pylist()
    assert [r["row"] for r in t] == [0, 1, 2, 3] and {r["layer"] for r in t} == {"features.2"}
    for r in t:
        assert r["status"] == "ok" and np.isfinite(r["road"]) and np.isfinite(r["road_random"])
        curve = [r[f"road_{k}_p{p}"] for k in ("morf", "lerf") for p in range(10, 100, 10)]
        assert all(0 <= v <= 1 for v in curve)
        assert r["road"] == pytest.approx(np.mean([(r[f"road_lerf_p{p}"] - r[f"road_morf_p{p}"]) / 2
                                                   for p in range(10, 100, 10)]))
    plot = root / "yb.png"
    assert main(["road", "--model", card, "--data", manifest, "--out", str(root / "all.parquet"), "--layers", "all",
                 "--sample", "2", "--seed", "0", "--plot", str(plot), "--layers-file", str(root / "layers.parquet"),
                 "--quiet"]) == 0
    every = pq.read_table(root / "all.parquet")
    yb = results.run_metadata(every)["ybroad"]
    assert every.num_rows == 2 * 4 and yb["best_layer"] in {"features.0", "features.1", "features.2", "features.3"}
    assert yb["ybroad_max"] >= yb["ybroad_mean"] and len(yb["curve"]) == 4
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # an image's score depends on its map, the seed and its row, not on the images sampled with it
    # (nor on the map coming from the single-layer engine or the all-layer pass)
    first = {r["row"]: r["road"] for r in t}
    again = [(r["row"], r["road"]) for r in every.to_pylist() if r["layer"] == "features.2"]
    assert len(again) == 2
    for row, v in again:
        assert v == pytest.approx(first[row], abs=1e-6)


def test_road_isolates_an_image_that_makes_the_model_raise(tmp_path, capsys):
    """As in run and layers: that image's rows say why, every other image is scored, exit 0."""
    _, manifest = make_set(tmp_path, n=4)
    (tmp_path / "images" / "white.png").write_bytes(png(np.full((32, 32, 3), 255, np.uint8)))
    lines = (tmp_path / "manifest.csv").read_text().splitlines()
    lines.insert(2, "images/white.png,masks/000.png,0,cam0")  # row 1, inside the first batch
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
    card = zoo_card(tmp_path, "picky_net")
    for layers in ("final", "all"):
        out = str(tmp_path / f"road-{layers}.parquet")
        assert main(["road", "--model", card, "--data", manifest, "--out", out, "--layers", layers, "--quiet"]) == 0
        rows = pq.read_table(out).to_pylist()
        bad = [r for r in rows if r["row"] == 1]
        assert bad and all(r["status"] == "error" and "white.png" in r["error"]
                           and "cannot handle bright images" in r["error"] for r in bad)
        assert {r["row"] for r in rows if r["status"] == "ok"} == {0, 2, 3, 4}


def test_road_all_zero_map_is_nan_with_a_reason_and_small_inputs_are_refused(tiny, capsys):
    root, _, manifest = tiny
    dead = zoo_card(root, "dead_net")
    out = str(root / "dead.parquet")
    assert main(["road", "--model", dead, "--data", manifest, "--out", out, "--quiet"]) == 0
    for r in pq.read_table(out).to_pylist():
        assert r["status"] == "no_activation" and r["road"] is None or np.isnan(r["road"])
        assert "all-zero" in r["error"] or "zero" in r["error"]
    (root / "small").mkdir(exist_ok=True)
    tiny2 = zoo_card(root / "small", "tiny_cnn", size=2)
    assert main(["road", "--model", tiny2, "--data", manifest, "--out", out, "--quiet"]) == 2
    assert "too small for ROAD percentiles" in capsys.readouterr().err


def test_faithfulness_rule_marks_the_decision_trusted_or_not(tiny, capsys):
    root, card, manifest = tiny
    res_uri, road = str(root / "r.parquet"), str(root / "road.parquet")
    if not (root / "road.parquet").exists():
        assert main(["road", "--model", card, "--data", manifest, "--out", road, "--quiet"]) == 0
    assert main(["run", "--model", card, "--data", manifest, "--out", res_uri, "--quiet"]) == 0
    margins = [r["road"] - r["road_random"] for r in pq.read_table(road).to_pylist()]
    for margin, trusted in ((min(margins) - 0.5, True), (max(margins) + 0.5, False)):
        p = root / "p.yaml"
        p.write_text(yaml.safe_dump({"rules": {"faithfulness": {"min_margin": round(margin, 3)},
                                               "no_activation_rate": None}}))
        capsys.readouterr()
        main(["gate", res_uri, "--policy", str(p), "--road", road])
        d = json.loads(capsys.readouterr().out)
        assert d["trusted"] is trusted and d["passed"] is trusted, [r for r in d["rules"] if r["verdict"] != "pass"]
        rule = next(r for r in d["rules"] if r["rule"] == "faithfulness")
        assert rule["value"] == pytest.approx(np.mean(margins)) and rule["n"] == 4
    # asked for, but no ROAD results: not trusted, and said why
    main(["gate", res_uri, "--policy", str(p)])
    d = json.loads(capsys.readouterr().out)
    assert d["trusted"] is False and "no ROAD results" in d["trust_reason"]
    from camgate import report
    from camgate.gating.decision import gate

    md = report.markdown(gate(res_uri, str(p), road=road), res_uri)
    assert "Heatmaps NOT trusted" in md


def test_layer_names_carry_across_verbs(tmp_path, capsys):
    """The name a user gives --target-layer (`layer3`) is the name layers and ROAD answer to: the plan's
    frame for it is `layer3.1.relu#1` (the same tensor), and the gate finds the results' layer in a
    ROAD file of several layers."""
    card, manifest = make_set(tmp_path, n=3)  # resnet18 at 64 px, target layer layer3
    out = str(tmp_path / "layers.parquet")
    assert main(["layers", "--model", card, "--data", manifest, "--out", out, "--layers", "layer2,layer3",
                 "--quiet"]) == 0
    md = results.run_metadata(pq.read_table(out))
    frame = next(f for f, names in md["layer_aliases"].items() if "layer3" in names)
    assert frame.startswith("layer3.1.") and frame in md["layers"] and len(md["layers"]) == 2
    res_uri, road = str(tmp_path / "r.parquet"), str(tmp_path / "road.parquet")
    assert main(["run", "--model", card, "--data", manifest, "--out", res_uri, "--quiet"]) == 0
    assert main(["road", "--model", card, "--data", manifest, "--out", road, "--layers", "layer2,layer3",
                 "--quiet"]) == 0
    policy = tmp_path / "p.yaml"
    policy.write_text(yaml.safe_dump({"rules": {"faithfulness": {"min_margin": -1}, "no_activation_rate": None}}))
    capsys.readouterr()
    main(["gate", res_uri, "--policy", str(policy), "--road", road])
    d = json.loads(capsys.readouterr().out)
    rule = next(r for r in d["rules"] if r["rule"] == "faithfulness")
    assert d["trusted"] is True and rule["n"] == 3, d.get("trust_reason")
    scored = [r for r in pq.read_table(road).to_pylist() if r["layer"] == frame]
    assert rule["value"] == pytest.approx(np.mean([r["road"] - r["road_random"] for r in scored]))
