"""Champion/challenger rules, the test record, JUnit and the KFP metrics: what a reviewer reads and
an auditor files says exactly what the gate computed, about exactly the files it read."""
import hashlib
import json
import re
import xml.etree.ElementTree as ET

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from helpers import results_table as table

from camgate.cli import main
from camgate.gating.decision import evaluate
from camgate.gating.policy import RULES
from camgate.gating.stats import BaselineError
from camgate.report import MAX_METRICS, artifacts, metrics


def rule(d, name, scope="all"):
    return next(r for r in d.rules if r.rule == name and r.scope == scope)


BASE_POLICY = {"rules": {"baseline_mean_increase": {"max": 0.02},
                         "baseline_share_worse": {"by": 0.1, "max": 0.2}}}


# --------------------------------------------------------------------------- champion / challenger


def test_baseline_rules_pair_by_row_and_image_not_by_position():
    rng = np.random.default_rng(1)
    cand = rng.random(30)
    base = np.clip(cand - rng.normal(0.0, 0.15, 30), 0, 1)
    status_c = ["ok"] * 28 + ["error", "ok"]
    status_b = ["ok"] * 29 + ["no_activation"]
    order = rng.permutation(30)  # the baseline file lists the images in another order
    bt = table(base[order].tolist(), [status_b[i] for i in order], rows=order.tolist())
    d = evaluate(table(cand.tolist(), status_c), BASE_POLICY, baseline=bt)
    both = (np.array(status_c) == "ok") & (np.array(status_b) == "ok")
    delta = cand[both] - base[both]
    assert d.baseline["baseline_compared"] == both.sum() == 28
    assert d.overall["baseline_mean_increase"] == pytest.approx(delta.mean(), abs=1e-12)
    assert d.overall["baseline_share_worse"] == pytest.approx(np.mean(delta > 0.1), abs=1e-12)
    assert rule(d, "baseline_mean_increase").verdict == ("pass" if delta.mean() <= 0.02 else "fail")
    assert not d.warnings


def test_a_regression_fails_and_an_improvement_passes():
    base = table([0.2] * 20)
    worse = evaluate(table([0.2] * 15 + [0.6] * 5), BASE_POLICY, baseline=base)
    assert rule(worse, "baseline_mean_increase").value == pytest.approx(0.1)
    assert rule(worse, "baseline_share_worse").value == pytest.approx(0.25)
    assert not worse.passed and len(worse.failed) == 2
    better = evaluate(table([0.1] * 20), BASE_POLICY, baseline=base)
    assert better.passed and rule(better, "baseline_mean_increase").value == pytest.approx(-0.1)


def test_without_a_baseline_the_baseline_rules_are_skipped_with_the_reason():
    d = evaluate(table([0.2] * 5), BASE_POLICY)
    for name in ("baseline_mean_increase", "baseline_share_worse"):
        r = rule(d, name)
        assert r.verdict == "skip" and "no baseline" in r.reason
    assert d.passed and d.baseline is None


def test_a_baseline_of_other_images_exits_2(tmp_path, capsys):
    pq.write_table(table([0.2] * 4), tmp_path / "r.parquet")
    pq.write_table(table([0.2] * 4, images=[f"/other/{i}.png" for i in range(4)]), tmp_path / "b.parquet")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(BASE_POLICY))
    with pytest.raises(BaselineError, match="no image in common"):
        evaluate(str(tmp_path / "r.parquet"), BASE_POLICY, baseline=str(tmp_path / "b.parquet"))
    rc = main(["gate", str(tmp_path / "r.parquet"), "--policy", str(tmp_path / "p.yaml"),
               "--baseline", str(tmp_path / "b.parquet")])
    assert rc == 2 and "b.parquet: no image in common" in capsys.readouterr().err


def test_a_partial_or_differently_computed_baseline_is_compared_with_warnings():
    base = table([0.2] * 3, rows=[0, 1, 2], md={"method": "gradcam++", "target_layer": ["layer3"]})
    d = evaluate(table([0.3] * 5, md={"method": "gradcam", "target_layer": ["layer4"]}), BASE_POLICY, baseline=base)
    text = " ".join(d.warnings)
    assert "method 'gradcam++'" in text and "target_layer ['layer3']" in text
    assert "2 of 5 result rows have no baseline row" in text
    assert d.baseline["baseline_compared"] == 3 and d.baseline["method"] == "gradcam++"
    # every setting that changes what a ratio measures is compared, not only the method
    for key, mine, theirs in (("target", "predicted", "label"), ("static_mask", None, "s3://b/cam7.png"),
                              ("mask_spec", {"marks": "invalid"}, {"marks": "valid"}), ("topk", 0.1, 0.2)):
        d = evaluate(table([0.3] * 3, md={key: mine}), BASE_POLICY, baseline=table([0.2] * 3, md={key: theirs}))
        assert [w for w in d.warnings if w.startswith(f"baseline computed with {key} ")], (key, d.warnings)
    page = artifacts(table([0.3] * 5, md={"method": "gradcam"}), BASE_POLICY, baseline=base, images=False)[1]
    assert b"method &#x27;gradcam++&#x27;" in page["report.html"] and b"gradcam++" in page["summary.md"]


@pytest.mark.parametrize("spec, msg", [({"by": 2}, r"by: must be a number in \[0, 1\]"),
                                       ({"max": 0.1, "ratio": 0.5}, "unknown key")])
def test_baseline_rule_parameters_are_checked(spec, msg):
    from camgate.gating.policy import PolicyError

    with pytest.raises(PolicyError, match=msg):
        evaluate(table([0.1]), {"rules": {"baseline_share_worse": {"max": 0.1, **spec}}})


# --------------------------------------------------------------------------- record, JUnit, metrics




def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_the_record_hashes_equal_the_real_files(real_run):
    r = real_run
    rc = main(["gate", r["results"], "--policy", str(r["policy"]), "--baseline", r["baseline"],
               "--record", str(r["tmp"] / "record.json"), "--report", str(r["tmp"] / "report.html"),
               "--junit", str(r["tmp"] / "junit.xml"), "--markdown", str(r["tmp"] / "summary.md")])
    assert rc == 0
    raw = (r["tmp"] / "record.json").read_bytes()
    rec = json.loads(raw)
    assert rec["schema"] == "camgate.test-record/1"
    assert rec["model"]["weights_sha256"] == sha(r["weights"])
    assert rec["model"]["card_sha256"] == sha(r["card"])
    assert rec["data"]["manifest_sha256"] == sha(r["manifest"])
    assert rec["policy"]["sha256"] == sha(r["policy"])
    assert rec["files"]["results"]["sha256"] == sha(r["results"])
    assert rec["files"]["baseline"]["sha256"] == sha(r["baseline"])
    assert rec["data"]["counts"]["rows"] == 10 and rec["method"]["map_resolution"] == [8, 8]  # tiny_cnn at 32 px
    assert rec["environment"]["torch"] == torch.__version__ and rec["environment"]["device"] == "cpu"
    assert rec["times"]["heatmaps_started_at"] <= rec["times"]["gate_started_at"] <= rec["times"]["gate_finished_at"]
    assert len(rec["requirements"]) == 7 and all(q["shows"] and q["does_not_show"] for q in rec["requirements"])
    assert set(rec["approval"]) >= {"name", "date", "signature"} and not any(rec["approval"].values())
    # every rule is recorded, passed ones too, and the baseline's deltas
    assert {q["verdict"] for q in rec["rules"]} >= {"pass", "fail"}
    assert rec["baseline"]["baseline_mean_increase"] is not None
    # the report names the record it belongs to
    assert sha(r["tmp"] / "record.json") in (r["tmp"] / "report.html").read_text()
    assert sha(r["tmp"] / "record.json") in (r["tmp"] / "summary.md").read_text()


def test_junit_has_one_case_per_rule_and_one_failure_per_failed_rule(real_run):
    r = real_run
    decision, files = artifacts(r["results"], str(r["policy"]), baseline=r["baseline"], images=False)
    root = ET.fromstring(files["junit.xml"])
    cases = root.findall(".//testcase")
    assert len(cases) == len(decision.rules) > 3
    assert len(root.findall(".//testcase/failure")) == len(decision.failed) > 0
    suite = root.find("testsuite")
    assert int(suite.get("failures")) == len(decision.failed)
    failed_names = sorted(c.get("classname").rsplit(".", 1)[-1] + ":" + c.get("name")
                          for c in cases if c.find("failure") is not None)
    assert failed_names == sorted(f"{f.scope}:{f.rule}" for f in decision.failed)
    assert "gradcam++" in suite.find("system-out").text  # the warning about the other method


def test_markdown_has_no_raw_html(real_run):
    md = artifacts(real_run["results"], str(real_run["policy"]), images=False)[1]["summary.md"].decode()
    assert not re.search(r"<[A-Za-z/!]", md)
    assert len(md) < 400_000


def test_kfp_metrics_stay_few_with_every_rule():
    sanity = ("randomised_similarity", "random_logit_similarity")
    every = {name: ({"min_margin": 0.0} if name == "faithfulness" else 1 if name == "min_images" else {"max": 0.9})
             for name in RULES if name not in sanity}
    every["sanity"] = {"max_randomised_similarity": 0.5, "max_random_logit_similarity": 0.5}
    road = pa.table({"road": [0.3, 0.4], "road_random": [0.0, 0.1], "status": ["ok", "ok"],
                     "randomised_spearman": [0.1, 0.2], "randomised_ssim": [0.1, 0.2],
                     "random_logit_spearman": [0.3, 0.4], "random_logit_ssim": [0.3, 0.4]})
    results = table([0.2, 0.5, 0.9]).append_column("relevance_rank_accuracy", pa.array([0.1, 0.2, 0.3])) \
        .append_column("auc", pa.array([0.5, 0.6, 0.7]))
    d = evaluate(results, {"rules": every, "per_class": True}, road=road, baseline=table([0.1] * 3))
    m = metrics(d)
    assert len(m) <= MAX_METRICS == 36
    assert {f"margin_{name}" for name in RULES} <= set(m)
    assert m["p95_invalid_activation_ratio"] == pytest.approx(np.percentile([0.2, 0.5, 0.9], 95))
    assert m["margin_mean_invalid_activation_ratio"] == pytest.approx(0.9 - np.mean([0.2, 0.5, 0.9]))
    assert m["margin_faithfulness"] == pytest.approx(0.3)
    assert m["margin_randomised_similarity"] == pytest.approx(0.35)
    assert m["mean_random_logit_spearman"] == pytest.approx(0.35)
    assert m["trusted"] == 1.0 and m["passed"] == 0.0  # share_images_over ... fails, margin negative
    assert min(v for k, v in m.items() if k.startswith("margin_")) < 0


def test_report_verb_writes_the_page(real_run, tmp_path):
    out = tmp_path / "r.html"
    assert main(["report", real_run["results"], "--out", str(out), "--baseline", real_run["baseline"]]) == 0
    page = out.read_text()
    assert "Champion vs challenger" in page and "Evidence" in page and "data:image/png;base64," in page


def test_the_pipeline_baseline_step_computes_copies_or_says_none(real_run, tmp_path):
    from camgate.errors import ConfigError
    from camgate.steps import baseline_step, gate_step

    r = real_run
    policy = str(r["policy"])
    computed, copied, none = (str(tmp_path / f"{n}.parquet") for n in ("computed", "copied", "none"))
    baseline_step(computed, r["manifest"], model_card=str(r["card"]), method="gradcam++")
    baseline_step(copied, r["manifest"], results_uri=r["baseline"])
    baseline_step(none, r["manifest"])
    with pytest.raises(ConfigError, match="not both"):
        baseline_step(none, r["manifest"], model_card=str(r["card"]), results_uri=r["baseline"])
    # computed in the run = computed before (same model, method and data)
    assert (pq.read_table(computed).column("invalid_activation_ratio").to_pylist()
            == pq.read_table(r["baseline"]).column("invalid_activation_ratio").to_pylist())
    with_base = gate_step(r["results"], policy, baseline=copied)[0]
    without = gate_step(r["results"], policy, baseline=none)[0]
    assert rule(with_base, "baseline_mean_increase").verdict in ("pass", "fail")
    assert rule(without, "baseline_mean_increase").verdict == "skip" and without.baseline is None


@pytest.mark.parametrize("task,what", [("detection", "one row per detection"),
                                       ("segmentation", "one row per explained class"),
                                       ("multilabel", "one row per explained class")])
def test_baseline_rules_refuse_per_object_results(task, what):
    """A run of several rows per image cannot be paired image by image: on either side, refused by name."""
    from camgate.io.results import IDENTITY_KEY

    objects = table([0.2, 0.3], md={IDENTITY_KEY: {"task": task}})
    for cand, base in ((objects, table([0.1, 0.1])), (table([0.1, 0.1]), objects)):
        with pytest.raises(BaselineError, match=f"a {task} model's results \\({what}\\)"):
            evaluate(cand, BASE_POLICY, baseline=base)
