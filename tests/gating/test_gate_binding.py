"""The gate checks what it is given against the results' run identity: a ROAD file of other maps, a
heatmaps-only or duplicated champion, NaN deltas. Each refusal names the field and both values."""
import json
import shutil

import pyarrow as pa
import pytest
from helpers import make_set, results_table, tiny_card, write_policy

from camgate.cli import main
from camgate.errors import IdentityError
from camgate.gating.decision import evaluate
from camgate.gating.stats import BaselineError
from camgate.io import results as res

TRUST = {"faithfulness": {"min_margin": -1.0}}  # any ROAD file of the run's maps makes it trusted
SHARE = {"baseline_share_worse": {"by": 0.1, "max": 0.2}}


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """resnet18 (64 px) and tiny_cnn results on one 4-image set, and tiny_cnn's ROAD file of it."""
    root = tmp_path_factory.mktemp("binding")
    resnet, manifest = make_set(root, n=4)
    tiny = str(tiny_card(root / "tiny"))
    files = {"root": root, "manifest": manifest, "resnet": resnet, "tiny": tiny}
    for name, argv in (("res_resnet", ["--model", resnet]), ("res_tiny", ["--model", tiny]),
                       ("res_decam", ["--model", tiny, "--method", "decam", "--budget", "8"]),
                       ("res_layer0", ["--model", tiny, "--target-layer", "features.0"]),
                       ("heatmaps_tiny", ["--model", tiny, "--heatmaps-only"])):
        files[name] = str(root / f"{name}.parquet")
        assert main(["run", *argv, "--data", manifest, "--out", files[name], "--quiet"]) == 0, name
    files["road_tiny"] = str(root / "road_tiny.parquet")
    assert main(["road", "--model", tiny, "--data", manifest, "--out", files["road_tiny"], "--quiet"]) == 0
    files["trust"] = write_policy(root / "trust.yaml", TRUST)
    files["share"] = write_policy(root / "share.yaml", SHARE)
    return files


# --------------------------------------------------------------------------- gate --road


def test_the_road_file_of_the_run_makes_it_trusted(runs, capsys):
    code, out, err = cli(capsys, "gate", runs["res_tiny"], "--policy", runs["trust"], "--road", runs["road_tiny"])
    assert code == 0, err
    assert json.loads(out)["trusted"] is True


def test_a_road_file_of_another_model_is_refused_naming_the_field(runs, capsys):
    code, out, err = cli(capsys, "gate", runs["res_resnet"], "--policy", runs["trust"], "--road", runs["road_tiny"])
    assert code == 2 and not out, out  # was: exit 0 and "trusted": true
    road_id = res.file_identity(res.run_metadata(runs["road_tiny"]))
    mine = res.file_identity(res.run_metadata(runs["res_resnet"]))
    assert "model_card_sha256" in err
    assert road_id["model_card_sha256"] in err and mine["model_card_sha256"] in err


def test_a_gradcam_road_file_cannot_vouch_for_decam_results(runs):
    with pytest.raises(IdentityError, match=r"method is 'gradcam' in the ROAD file but 'decam' in the results"):
        evaluate(runs["res_decam"], runs["trust"], road=runs["road_tiny"])


def test_a_road_file_of_another_layer_is_refused(runs):
    with pytest.raises(IdentityError, match=r"target_layer is \['features.2'\] in the ROAD file but 'features.0'"):
        evaluate(runs["res_layer0"], runs["trust"], road=runs["road_tiny"])


def test_a_road_file_of_other_images_is_refused(runs, tmp_path):
    _, other = make_set(tmp_path, n=4)
    road = str(tmp_path / "road.parquet")
    assert main(["road", "--model", runs["tiny"], "--data", other, "--out", road, "--quiet"]) == 0
    with pytest.raises(IdentityError, match=r"row 0's image is '.*/000\.png' in the ROAD file but '.*/000\.png' in "
                                            r"the results"):
        evaluate(runs["res_tiny"], runs["trust"], road=road)
    # a sample of the run's own images is fine
    sample = str(tmp_path / "sample.parquet")
    assert main(["road", "--model", runs["tiny"], "--data", runs["manifest"], "--out", sample, "--sample", "2",
                 "--quiet"]) == 0
    assert evaluate(runs["res_tiny"], runs["trust"], road=sample).trusted is True


# --------------------------------------------------------------------------- gate --baseline


def test_a_heatmaps_only_champion_is_refused_naming_the_stage(runs, capsys):
    code, _, err = cli(capsys, "gate", runs["res_tiny"], "--policy", runs["share"], "--baseline",
                       runs["heatmaps_tiny"], "--fail-on-violation")
    assert code == 2, err  # was: exit 0, baseline_share_worse passed on NaN deltas
    assert "stage is 'heatmaps'" in err and "heatmaps_tiny.parquet" in err


def test_nan_deltas_fail_the_share_rule_instead_of_counting_as_not_worse():
    base = results_table([float("nan")] * 4, md={"stage": "results"})
    d = evaluate(results_table([0.3] * 4), {"rules": SHARE}, baseline=base)
    r = next(r for r in d.rules if r.rule == "baseline_share_worse")
    assert r.verdict == "fail" and "NaN" in r.reason, r
    assert not d.passed


def test_a_baseline_with_duplicate_rows_is_refused_naming_them():
    one = results_table([0.2] * 4)
    twice = pa.concat_tables([one, one])
    with pytest.raises(BaselineError, match=r"row\(s\) 0, 1, 2, 3 appear more than once \(4 duplicate rows\)"):
        evaluate(results_table([0.3] * 4), {"rules": SHARE}, baseline=twice)
    # no "-4 of 4 result rows have no baseline row": the count is never negative
    d = evaluate(results_table([0.3] * 4), {"rules": SHARE}, baseline=one)
    assert d.overall["baseline_unpaired"] == 0 and not [w for w in d.warnings if "no baseline row" in w]


def test_a_champion_of_another_layer_stays_a_warning(runs):
    d = evaluate(runs["res_tiny"], {"rules": SHARE}, baseline=runs["res_layer0"])
    assert any(w.startswith("baseline computed with target_layer ['features.0'], the results with ['features.2']")
               for w in d.warnings), d.warnings
    assert d.baseline["baseline_paired"] == 4


def test_a_champion_computed_on_other_image_content_is_refused(runs, tmp_path):
    data = tmp_path / "set"
    shutil.copytree(runs["root"] / "images", data / "images")
    shutil.copytree(runs["root"] / "masks", data / "masks")
    shutil.copy(runs["manifest"], data / "manifest.csv")
    manifest = str(data / "manifest.csv")
    base, cand = str(tmp_path / "base.parquet"), str(tmp_path / "cand.parquet")
    assert main(["run", "--model", runs["tiny"], "--data", manifest, "--out", base, "--quiet"]) == 0
    img = data / "images" / "001.png"
    img.write_bytes((data / "images" / "002.png").read_bytes())  # same URI, other content
    assert main(["run", "--model", runs["tiny"], "--data", manifest, "--out", cand, "--quiet"]) == 0
    with pytest.raises(BaselineError, match=r"row 1 \(.*001\.png\) has image_sha256 [0-9a-f]{64} in the baseline "
                                            r"but [0-9a-f]{64} in the results"):
        evaluate(cand, {"rules": SHARE}, baseline=base)
    assert evaluate(base, {"rules": SHARE}, baseline=base).overall["baseline_paired"] == 4
