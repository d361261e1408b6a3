"""What one gate run shows, and does not show, for each of the EU's seven key requirements for
Trustworthy AI (High-Level Expert Group on AI, 2019), as Borg et al. (2021) map heatmap testing onto
them. The text is built from the run itself, so it never claims a check that did not happen.
"""
from __future__ import annotations

from ..gating.decision import Decision

REQUIREMENTS = (
    ("human_agency", "Human agency and oversight"),
    ("robustness", "Technical robustness and safety"),
    ("privacy", "Privacy and data governance"),
    ("transparency", "Transparency"),
    ("fairness", "Diversity, non-discrimination and fairness"),
    ("wellbeing", "Societal and environmental well-being"),
    ("accountability", "Accountability"),
)


def requirements(decision: Decision, md: dict, data: dict | None = None, detection: dict | None = None) -> list[dict]:
    """One entry per requirement: ``key``, ``requirement``, ``shows``, ``does_not_show``. ``data``: the
    record's data section; the text names only the hashes it holds. ``detection``: a detection run's
    counts (:func:`camgate.report.detection.summary`)."""
    c = decision.counts
    o = decision.overall
    method = md.get("method") or "?"
    layers = ", ".join(md.get("target_layer") or []) or "the model's outputs (black box)"
    verdict = "passed" if decision.passed else "failed"
    scopes = sorted({r.scope.split("=", 1)[0] for r in decision.rules if r.scope != "all"})
    if decision.trusted is None:
        faith = "The heatmaps' faithfulness was not measured (no ROAD results): the maps are taken on trust."
    else:
        faith = f"Heatmaps {'trusted' if decision.trusted else 'NOT trusted'}: {decision.trust_reason}."
    base = decision.baseline
    regress = (f"Compared with champion {base.get('model') or '?'} on {base.get('baseline_compared')} images ok in "
               f"both runs: mean ratio change {_f(base.get('baseline_mean_increase'))}."
               if base else "No champion was compared: a regression against the production model is not checked.")
    if detection:
        tested = (f"On {detection['images']} test images, {detection['detections']} detections were found and "
                  f"{detection['explained']} explained ({detection['missed']} ground-truth boxes missed, "
                  f"{detection['no_detection']} images without a detection); {c['ok']} detections were judged")
    else:
        tested = f"On {c['rows']} test images, {c['ok']} were judged"
    text = {
        "human_agency": (
            f"The verdict ({verdict}) is a gate that stops promotion; a person can read every rule, the worst "
            f"images and their heatmaps in the report, and must sign the record below.",
            "That anyone reviewed the heatmaps: the approval fields are empty until a person fills them."),
        "robustness": (
            f"{tested}; the {method} heatmaps at {layers} put a mean "
            f"{_f(o.get('mean_invalid_activation_ratio'))} of their mass on invalid pixels (p95 "
            f"{_f(o.get('p95_invalid_activation_ratio'))}), so the model's use of shortcuts there was tested. "
            f"{faith} {regress}",
            "Accuracy, robustness to perturbations or distribution shift beyond this data set, and any behaviour "
            "on images unlike these; a heatmap shows where the model looked, not that its answer is right."),
        "privacy": (
            _data_named(data or {}),
            "Whether the images hold personal data or were collected lawfully; camgate does not inspect content "
            "for that."),
        "transparency": (
            "Per-image heatmaps, the policy with its thresholds and every rule's value are kept (results "
            "Parquet, this report, record.json), so the verdict can be re-derived.",
            "A full explanation of the model: a class activation map is a post-hoc view of one layer"
            + (" whose faithfulness was not measured." if decision.trusted is None else ".")),
        "fairness": (
            (f"Rules were also judged per {', '.join(scopes)}, so a failing group shows on its own."
             if scopes else "The rules were judged over the whole data set only."),
            "Fairness across groups of people: only the scopes above were compared, and only for where the "
            "heatmaps fall, not for outcomes."),
        "wellbeing": (
            "Nothing specific: the gate measures where the model looks.",
            "Societal or environmental effects of the model, or the energy this test used."),
        "accountability": (
            "The record names the model (card and weights sha256), data, policy, method, software versions and "
            "times, and is hashed in the report, so an auditor can check the files are the ones tested.",
            "Who is responsible: the approver's name, date and signature are left for people to fill."),
    }
    return [{"key": k, "requirement": name, "shows": text[k][0], "does_not_show": text[k][1]}
            for k, name in REQUIREMENTS]


def _data_named(data: dict) -> str:
    """How the record names the test data: only the hashes it holds."""
    fp = ("a fingerprint over every image's row, URI and content sha256 (and its mask's, where masks were "
          "read)") if data.get("fingerprint") else None
    if data.get("manifest_sha256") and fp:
        return f"The test data is named in the record by its manifest's URI and sha256 and by {fp}, so the " \
               f"images used can be traced."
    if fp:
        return f"The test data is named in the record by {fp}, so the images used can be traced; there is no " \
               f"manifest file to hash (a prefix data set, or parts merged without the manifest)."
    if data.get("manifest_sha256"):
        return "The test data is named in the record by its manifest's URI and sha256; the images' content is " \
               "not hashed (results from before the data fingerprint), so changed files behind the same URIs " \
               "would go unnoticed."
    return "The test data is named by URI only: the record holds no hash of it, so it cannot show which images " \
           "were used."


def _f(v) -> str:
    return "n/a" if v is None or not isinstance(v, (int, float)) or v != v else f"{v:.3f}"
