"""The decision as JUnit XML: one test case per rule and scope, so CI systems (GitLab, Jenkins,
GitHub test reporters) show the gate natively. A failed rule is a <failure>, a skipped one <skipped>."""
from __future__ import annotations

import xml.etree.ElementTree as ET

from ..gating.decision import Decision

_OPS = {"<=": "<=", ">=": ">="}


def _num(v) -> str:
    return "n/a" if v is None or v != v else f"{v:.6g}"


def junit(decision: Decision, name: str = "camgate", record: dict | None = None) -> bytes:
    """``record`` (:func:`camgate.report.record.build`): a detection run's counts go into the suite's
    properties and output (images, detections found and explained, missed, no_detection); a segmentation
    or multi-label run's likewise (images, rows, classes explained, no_region / no_label)."""
    verdicts = [r.verdict for r in decision.rules]
    suites = ET.Element("testsuites", name=name)
    suite = ET.SubElement(suites, "testsuite", name=f"{name}: policy {decision.policy}", tests=str(len(verdicts)),
                          failures=str(verdicts.count("fail")), errors="0", skipped=str(verdicts.count("skip")))
    det = (record or {}).get("detection")
    task = (record or {}).get("task")
    objects = (record or {}).get(task) if task in ("segmentation", "multilabel") else None
    if det or objects:
        props = ET.SubElement(suite, "properties")
        keys = ("task", "images", "detections", "explained", "missed", "no_detection", "error") if det else \
            ("task", "images", "rows", "explained", "no_region" if task == "segmentation" else "no_label", "error")
        for k in keys:
            ET.SubElement(props, "property", name=k, value=str((det or objects).get(k)))
    for r in decision.rules:
        label = r.rule + "".join(f" {k}={v:g}" if isinstance(v, float) else f" {k}={v}" for k, v in r.params.items())
        case = ET.SubElement(suite, "testcase", classname=f"{name}.{decision.policy}.{r.scope}", name=label)
        text = f"{r.rule} @ {r.scope}: {_num(r.value)} {_OPS[r.op]} {_num(r.threshold)} required (n={r.n})"
        if r.verdict == "fail":
            ET.SubElement(case, "failure", message=text + (f": {r.reason}" if r.reason else ""), type="RuleViolated")
        elif r.verdict == "skip":
            ET.SubElement(case, "skipped", message=r.reason or "skipped")
        else:
            ET.SubElement(case, "system-out").text = text
    notes = list(decision.warnings)
    if det:
        notes.append(f"detection run: {det['images']} images, {det['detections']} detections "
                     f"({det['explained']} explained), {det['missed']} missed, {det['no_detection']} without a "
                     f"detection")
    if objects:
        empty = "no_region" if task == "segmentation" else "no_label"
        notes.append(f"{task} run: {objects['images']} images, {objects['rows']} rows ({objects['explained']} classes "
                     f"explained, {objects[empty]} {empty})")
    if decision.trusted is not None:
        notes.append(f"heatmaps {'trusted' if decision.trusted else 'NOT trusted'}: {decision.trust_reason}")
    if notes:
        ET.SubElement(suite, "system-out").text = "\n".join(notes)
    ET.indent(suites)
    return ET.tostring(suites, encoding="utf-8", xml_declaration=True) + b"\n"
