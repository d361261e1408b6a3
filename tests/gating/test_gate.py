import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from camgate.gating.decision import Decision, evaluate, gate
from camgate.gating.policy import PolicyError, load_policy
from camgate.io.results import ResultsError

NAN = float("nan")


def results(ratio, area=None, peak=None, status=None, cls=None, camera=None, label=None):
    n = len(ratio)
    status = status or ["ok"] * n
    cls = cls if cls is not None else [0] * n
    names = {0: "cat", 1: "dog"}
    return pa.table({
        "image_id": [f"img{i}" for i in range(n)],
        "image": [f"/data/img{i}.png" for i in range(n)],
        "status": status,
        "error": ["boom" if s == "error" else None for s in status],
        "label": label or [None] * n,
        "predicted_class": pa.array([None if s == "error" else c for s, c in zip(status, cls)], pa.int64()),
        "predicted_label": [None if s == "error" else names.get(c) for s, c in zip(status, cls)],
        "invalid_activation_ratio": pa.array(ratio, pa.float32()),
        "invalid_area_ratio": area or [0.25] * n,
        "peak_in_invalid": peak or [False] * n,
        "camera": camera or ["a"] * n,
        "cam": [b"\x00\x00"] * n,
    })


def rule(d: Decision, name: str, scope: str = "all") -> dict:
    hits = [r for r in d.to_dict()["rules"] if r["rule"] == name and r["scope"] == scope]
    assert len(hits) == 1, (name, scope, hits)
    return hits[0]


def test_overall_values_match_numpy():
    rng = np.random.default_rng(0)
    ratio = rng.random(40).astype(np.float32)
    area = rng.random(40).tolist()
    peak = (rng.random(40) > 0.7).tolist()
    status = ["ok"] * 34 + ["no_activation"] * 3 + ["error"] * 3
    ratio[34:] = np.nan
    t = results(ratio.tolist(), area, peak, status)
    d = evaluate(t, {"rules": {"share_images_over": {"ratio": 0.6, "max": 1.0}}})
    ok = np.array(status) == "ok"
    r = t.column("invalid_activation_ratio").to_numpy().astype(np.float64)[ok]
    a = np.array(area)[ok]
    o = d.overall
    assert d.counts == {"rows": 40, "ok": 34, "no_activation": 3, "error": 3}
    assert o["mean_invalid_activation_ratio"] == pytest.approx(r.mean())
    assert o["share_images_over"] == pytest.approx(np.mean(r > 0.6))
    assert o["peak_in_invalid_rate"] == pytest.approx(np.mean(np.array(peak)[ok]))
    assert o["mean_excess_over_area"] == pytest.approx(np.mean(r - a))
    assert o["error_rate"] == pytest.approx(3 / 40)
    assert o["no_activation_rate"] == pytest.approx(3 / 40)
    json.dumps(d.to_dict(), allow_nan=False)


@pytest.mark.parametrize("name,spec,values,boundary_ok", [
    ("mean_invalid_activation_ratio", {"max": 0.3}, [0.2, 0.4], True),  # mean is 0.30000000000000004
    ("share_images_over", {"ratio": 0.5, "max": 0.25}, [0.6, 0.1, 0.5, 0.2], True),  # 0.5 is not > 0.5
    ("mean_excess_over_area", {"max": 0.05}, [0.3, 0.3], True),  # float32 0.3 - 0.25 = 0.0500000119
])
def test_boundary_passes_and_just_above_fails(name, spec, values, boundary_ok):
    t = results(values)
    assert rule(evaluate(t, {"rules": {name: spec}}), name)["verdict"] == "pass"
    tighter = {**spec, "max": spec["max"] - 0.01}
    assert rule(evaluate(t, {"rules": {name: tighter}}), name)["verdict"] == "fail"


def test_peak_rate_and_min_images_boundaries():
    t = results([0.1] * 5, peak=[True, False, False, False, False])
    d = evaluate(t, {"rules": {"peak_in_invalid_rate": {"max": 0.2}, "min_images": 5}})
    assert rule(d, "peak_in_invalid_rate")["verdict"] == "pass"
    r = rule(d, "min_images")
    assert (r["value"], r["op"], r["verdict"]) == (5, ">=", "pass")
    d = evaluate(t, {"rules": {"peak_in_invalid_rate": 0.19, "min_images": 6}})
    assert rule(d, "peak_in_invalid_rate")["verdict"] == "fail"
    assert rule(d, "min_images")["verdict"] == "fail"
    assert not d.passed


def test_error_rate_defaults_to_zero_and_can_be_relaxed_or_disabled():
    t = results([0.1, 0.1, 0.1, NAN], status=["ok", "ok", "ok", "error"])
    d = evaluate(t, {"rules": {}})
    r = rule(d, "error_rate")
    assert (r["value"], r["threshold"], r["n"], r["verdict"]) == (0.25, 0.0, 4, "fail")
    assert not d.passed
    assert evaluate(t, {"rules": {"error_rate": {"max": 0.25}}}).passed
    d = evaluate(t, {"rules": {"error_rate": None}})
    assert d.passed and not [r for r in d.rules if r.rule == "error_rate"]


def test_empty_results_never_pass():
    d = evaluate(results([NAN, NAN], status=["error", "error"]), {"rules": {"error_rate": None,
                                                                          "mean_invalid_activation_ratio": 0.3}})
    assert rule(d, "min_images")["verdict"] == "fail"
    assert rule(d, "mean_invalid_activation_ratio")["verdict"] == "skip"
    assert not d.passed


def test_nan_ratio_on_ok_row_fails_not_passes():
    t = results([0.1, NAN, 0.1])
    d = evaluate(t, {"rules": {"mean_invalid_activation_ratio": 0.9, "share_images_over": {"max": 0.9}}})
    for name in ("mean_invalid_activation_ratio", "share_images_over"):
        r = rule(d, name)
        assert r["verdict"] == "fail" and r["value"] is None and "NaN" in r["reason"]
    assert not d.passed


def test_null_peak_on_ok_row_fails():
    t = results([0.1, 0.1], peak=[False, None])
    assert rule(evaluate(t, {"rules": {"peak_in_invalid_rate": 1.0}}), "peak_in_invalid_rate")["verdict"] == "fail"


def test_per_class_and_slice_scopes():
    ratio = [0.1, 0.2, 0.8, 0.9, 0.1, NAN]
    t = results(ratio, cls=[0, 0, 1, 1, 0, 0], camera=["a", "b", "a", "b", "b", "a"],
                status=["ok"] * 5 + ["no_activation"])
    d = evaluate(t, {"rules": {"mean_invalid_activation_ratio": {"max": 0.5}, "error_rate": None,
                               "no_activation_rate": 0.5},
                     "per_class": True, "slices": ["camera"]})
    assert rule(d, "mean_invalid_activation_ratio", "class=cat")["value"] == pytest.approx(np.mean([0.1, 0.2, 0.1]))
    assert rule(d, "mean_invalid_activation_ratio", "class=cat")["verdict"] == "pass"
    assert rule(d, "mean_invalid_activation_ratio", "class=dog")["verdict"] == "fail"
    assert rule(d, "mean_invalid_activation_ratio", "camera=a")["value"] == pytest.approx(np.mean([0.1, 0.8]))
    assert rule(d, "mean_invalid_activation_ratio", "camera=b")["n"] == 3
    assert rule(d, "no_activation_rate", "camera=a")["value"] == pytest.approx(1 / 3)
    assert not d.passed and [(r.rule, r.scope) for r in d.failed] == [("mean_invalid_activation_ratio", "class=dog")]
    assert {s["scope"] for s in d.to_dict()["scopes"]} == {"class=cat", "class=dog", "camera=a", "camera=b"}


def test_per_class_by_label_and_skip_on_empty_scope():
    t = results([0.1, NAN, NAN], status=["ok", "no_activation", "error"], label=["cat", "dog", "dog"])
    d = evaluate(t, {"rules": {"mean_invalid_activation_ratio": 0.5, "error_rate": 1.0, "no_activation_rate": 1.0},
                     "per_class": "label"})
    r = rule(d, "mean_invalid_activation_ratio", "class=dog")
    assert r["verdict"] == "skip" and r["n"] == 0 and "no ok images" in r["reason"]
    assert rule(d, "error_rate", "class=dog")["value"] == 0.5  # rows-based rules still judged
    assert d.passed


def test_min_scope_images_skips_small_scopes():
    t = results([0.9, 0.1, 0.1, 0.1], cls=[1, 0, 0, 0])
    d = evaluate(t, {"rules": {"mean_invalid_activation_ratio": 0.5}, "per_class": True, "min_scope_images": 2})
    assert rule(d, "mean_invalid_activation_ratio", "class=dog")["verdict"] == "skip"
    assert rule(d, "mean_invalid_activation_ratio", "class=cat")["verdict"] == "pass"


def test_policy_file_and_parquet_path(tmp_path):
    p = tmp_path / "strict.yaml"
    p.write_text("rules:\n  mean_invalid_activation_ratio: {max: 0.30}\n  min_images: 2\nslices: [camera]\n")
    pq.write_table(results([0.1, 0.2]), tmp_path / "r.parquet")
    d = gate(str(tmp_path / "r.parquet"), str(p))
    assert d.policy == "strict" and d.passed
    assert load_policy(load_policy(str(p)).to_dict()) == load_policy({**load_policy(str(p)).to_dict()})


@pytest.mark.parametrize("doc,key", [
    ({"rules": {"mean_ratio": 0.3}}, "rules.mean_ratio"),
    ({"rule": {}}, "rule"),
    ({"rules": {"share_images_over": {"ratio": 1.5, "max": 0.1}}}, "rules.share_images_over.ratio"),
    ({"rules": {"share_images_over": {"ratio": 0.5}}}, "rules.share_images_over.max"),
    ({"rules": {"peak_in_invalid_rate": {"max": "high"}}}, "rules.peak_in_invalid_rate.max"),
    ({"rules": {"error_rate": {"max": float("nan")}}}, "rules.error_rate.max"),
    ({"rules": {"error_rate": {"maximum": 0.1}}}, "rules.error_rate.maximum"),
    ({"rules": {"min_images": 2.5}}, "rules.min_images"),
    ({"rules": {"sanity": 0.5}}, "rules.sanity"),
    ({"rules": {"sanity": {}}}, "rules.sanity"),
    ({"rules": {"sanity": {"max_randomised_similarity": 1.5}}}, "rules.sanity.max_randomised_similarity"),
    ({"rules": {"sanity": {"max_random_logit_similarity": 0.5, "measure": "pearson"}}}, "rules.sanity.measure"),
    ({"rules": {"sanity": {"max_similarity": 0.5}}}, "rules.sanity.max_similarity"),
    ({"rules": {"randomised_similarity": {"max": 0.5}}}, "rules.randomised_similarity"),  # only via sanity
    ({"rules": {"mean_auc": {"max": 1.5}}}, "rules.mean_auc.max"),
    ({"per_class": "yes"}, "per_class"),
    ({"slices": [1]}, "slices"),
])
def test_policy_errors_name_the_key(tmp_path, doc, key):
    import yaml

    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(doc))
    with pytest.raises(PolicyError) as e:
        load_policy(str(p))
    assert str(p) in str(e.value) and f"{key}:" in str(e.value)


def test_unreadable_policy_and_results(tmp_path):
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(str(tmp_path / "missing.yaml"))
    (tmp_path / "bad.yaml").write_text("rules: [unclosed")
    with pytest.raises(PolicyError, match="not valid YAML"):
        load_policy(str(tmp_path / "bad.yaml"))
    with pytest.raises(PolicyError, match="slices: column 'site'"):
        evaluate(results([0.1]), {"slices": ["site"]})
    with pytest.raises(ResultsError):
        evaluate(str(tmp_path / "missing.parquet"), {})
    with pytest.raises(ResultsError, match="status"):
        evaluate(results([0.1], status=["weird"]), {})


def test_uris_go_through_storage(monkeypatch, tmp_path):
    from camgate.io import storage

    pq.write_table(results([0.1, 0.2]), tmp_path / "r.parquet")
    blobs = {"s3://b/r.parquet": (tmp_path / "r.parquet").read_bytes(),
             "s3://b/p.yaml": b"name: remote\nrules: {mean_invalid_activation_ratio: 0.15}\n"}
    monkeypatch.setattr(storage, "read_bytes", lambda uri: blobs[uri])
    d = gate("s3://b/r.parquet", "s3://b/p.yaml")
    assert d.policy == "remote" and d.overall["mean_invalid_activation_ratio"] == pytest.approx(0.15)
    assert d.passed


def test_sanity_policy_round_trips_and_picks_its_measure():
    p = load_policy({"rules": {"sanity": {"max_randomised_similarity": 0.4, "max_random_logit_similarity": 0.6,
                                          "measure": "ssim"}}})
    assert p.to_dict()["rules"]["sanity"] == {"max_randomised_similarity": 0.4, "max_random_logit_similarity": 0.6,
                                              "measure": "ssim"}
    assert load_policy(p.to_dict()) == load_policy({**p.to_dict(), "name": p.name})
    one = load_policy({"rules": {"sanity": {"max_random_logit_similarity": 0.6}}})
    assert [r.name for r in one.rules if "measure" in r.params] == ["random_logit_similarity"]
    road = pa.table({"status": ["ok", "ok", "no_activation"], "road": [0.3, 0.2, NAN], "road_random": [0.0, 0.0, NAN],
                     "randomised_spearman": [0.1, 0.3, NAN], "randomised_ssim": [0.5, 0.9, NAN],
                     "random_logit_spearman": [0.2, 0.2, NAN], "random_logit_ssim": [0.4, 0.8, NAN]})
    d = evaluate(results([0.1, 0.2]), p, road=road)
    # the mean over the scored (ok) rows of the measure the policy names: ssim 0.7 > 0.4 fails, 0.6 <= 0.6 passes
    assert rule(d, "randomised_similarity")["value"] == pytest.approx(0.7)
    assert rule(d, "randomised_similarity")["verdict"] == "fail" and rule(d, "randomised_similarity")["n"] == 2
    assert rule(d, "random_logit_similarity")["verdict"] == "pass"
    assert d.trusted is False and not d.passed
    assert "SSIM similarity of the maps to the fully randomised model's is 0.700 (not <= 0.4)" in d.trust_reason
    assert "another class's is 0.600 (<= 0.6)" in d.trust_reason
    d = evaluate(results([0.1, 0.2]), {"rules": {"sanity": {"max_randomised_similarity": 0.4}}}, road=road)
    assert d.trusted is True and d.overall["mean_randomised_spearman"] == pytest.approx(0.2)


def test_localisation_rules_judge_only_masks_with_both_kinds_of_pixels():
    t = results([0.1, 0.2, 0.3, 0.4], area=[0.0, 0.5, 0.25, 1.0])
    t = t.append_column("relevance_rank_accuracy", pa.array([NAN, 0.2, 0.4, NAN])) \
         .append_column("auc", pa.array([NAN, 0.6, 0.8, NAN]))
    pol = {"rules": {"mean_relevance_rank_accuracy": {"max": 0.3}, "mean_auc": 0.7}}
    d = evaluate(t, pol)
    rra, auc = rule(d, "mean_relevance_rank_accuracy"), rule(d, "mean_auc")
    assert rra["value"] == pytest.approx(0.3) and rra["n"] == 2 and rra["verdict"] == "pass"
    assert auc["value"] == pytest.approx(0.7) and auc["verdict"] == "pass"
    # a NaN where the mask has both kinds of pixels is missing, not undefined: the rule fails
    bad = t.set_column(t.column_names.index("auc"), "auc", pa.array([NAN, NAN, 0.8, NAN]))
    assert rule(evaluate(bad, pol), "mean_auc")["verdict"] == "fail"
    # no image in the metrics' domain: skipped, saying why
    empty = results([0.1, 0.2], area=[0.0, 1.0]).append_column("relevance_rank_accuracy", pa.array([NAN, NAN])) \
        .append_column("auc", pa.array([NAN, NAN]))
    r = rule(evaluate(empty, pol), "mean_auc")
    assert r["verdict"] == "skip" and "undefined on an empty or full mask" in r["reason"]
    # results written without the columns cannot pass the rule
    r = rule(evaluate(results([0.1]), pol), "mean_relevance_rank_accuracy")
    assert r["verdict"] == "fail" and "no relevance_rank_accuracy column" in r["reason"]
