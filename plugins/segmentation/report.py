"""The segmentation section of the report: Dice per class against severity, the voxel reliability
diagram, the Dice-failure detection table and the overlays of image, reference and prediction (drawn
by the audit, in results.json ``assets``). Built on the public view helpers only, from results.json
alone."""

from __future__ import annotations

from typing import Any

from medaudit.report.views import (
    Figure, Row, Series, Table, clean_scenario, confidence_label, degradation, estimate_columns, estimate_values, fmt,
    fmt_ci, perturbed_scenarios, reliability, value,
)
from medaudit.sections import ReportSection

TEMPLATE = """\
{% if dice %}{% with f = dice %}{% include "sections/_figure.html" %}{% endwith %}{% endif %}
{% if voxels %}{% with f = voxels %}{% include "sections/_figure.html" %}{% endwith %}{% endif %}
{% if failures %}{% with t = failures %}{% include "sections/_table.html" %}{% endwith %}{% endif %}
<p class="note">{{ threshold }} Every score's failure-detection AUROC in every scenario is in the appendix and in <code>tables/segmentation-failure_detection.csv</code>.</p>
{% for o in overlays %}
<figure>
  <img class="preview" src="data:image/png;base64,{{ o.png }}" alt="{{ o.alt }}">
  <figcaption>{{ o.caption }}</figcaption>
</figure>
{% endfor %}
"""

#: The clean samples the audit draws (medaudit.overlays.POSITIONS), in this order.
OVERLAY_POSITIONS = ("best", "median", "worst")


def _worst(r: dict[str, Any], key: str, n: int) -> list[dict[str, Any]]:
    """The ``n`` perturbations with the lowest ``key`` (each at its worst severity)."""
    by_pert: dict[str, dict[str, Any]] = {}
    scored = [s for s in perturbed_scenarios(r) if value(s["metrics"].get(key)) is not None]
    for s in sorted(scored, key=lambda s: (s["metrics"][key]["value"], s["id"])):
        by_pert.setdefault(s["perturbation"], s)
    return sorted(by_pert.values(), key=lambda s: (s["metrics"][key]["value"], s["id"]))[:n]


def dice_figure(r: dict[str, Any], worst: int = 3) -> Figure | None:
    """Dice per foreground class against severity, for the perturbations that hurt Dice most."""
    clean = clean_scenario(r)
    if clean is None:
        return None
    classes = [k.split("/", 1)[1] for k in clean["metrics"] if k.startswith("dice/")]
    panels = []
    for s in _worst(r, "dice", worst):
        runs = sorted((x for x in perturbed_scenarios(r) if x["perturbation"] == s["perturbation"]),
                      key=lambda x: x["severity"])
        series = []
        for c in classes:
            key = f"dice/{c}"
            points = [clean] + runs
            series.append(Series(c, [0] + [x["severity"] for x in runs],
                                 [value(x["metrics"].get(key)) for x in points],
                                 [(x["metrics"].get(key) or {}).get("ci_low") for x in points],
                                 [(x["metrics"].get(key) or {}).get("ci_high") for x in points],
                                 [False] + [bool((x.get("drop", {}).get(key) or {}).get("significant")) for x in runs]))
        panels.append((s["perturbation"], "Dice", series))
    if not panels:
        return None
    alt = "Dice per class against severity for " + ", ".join(p[0] for p in panels)
    svg = degradation(panels, "segmentation-dice", alt, [True] * len(panels))
    return Figure(svg, f"Dice per class against severity (0 = clean) with {confidence_label(r)} bootstrap bands, for "
                       f"the {len(panels)} perturbations that lower Dice most; filled markers are significant drops.")


def voxel_reliability(r: dict[str, Any], worst: int = 3) -> Figure | None:
    """Voxel reliability curves of clean data and of the perturbations with the highest ECE."""
    clean = clean_scenario(r)
    if clean is None or "voxel_reliability" not in clean.get("curves", {}):
        return None
    by_pert: dict[str, dict[str, Any]] = {}
    scored = [s for s in perturbed_scenarios(r) if "voxel_reliability" in s.get("curves", {})
              and value(s["metrics"].get("ece")) is not None]
    for s in sorted(scored, key=lambda s: (-s["metrics"]["ece"]["value"], s["id"])):
        by_pert.setdefault(s["perturbation"], s)
    chosen = sorted(by_pert.values(), key=lambda s: (-s["metrics"]["ece"]["value"], s["id"]))[:worst]
    curves = [(f"clean (ECE {fmt(value(clean['metrics'].get('ece')))})", clean["curves"]["voxel_reliability"]["bins"])]
    curves += [(f"{s['id']} (ECE {fmt(s['metrics']['ece']['value'])})", s["curves"]["voxel_reliability"]["bins"])
               for s in chosen]
    svg = reliability(curves, "segmentation-reliability", "Voxel reliability diagram: " + ", ".join(c[0] for c in curves))
    return Figure(svg, "Voxel reliability diagram (top-label, every voxel a sample) of clean data and of the "
                       f"{len(chosen)} perturbations with the highest voxel ECE, each at its worst severity.")


def failure_tables(r: dict[str, Any]) -> tuple[Table | None, Table | None]:
    """The compact table (per scenario with failures: the mean entropy's and the best detector's
    AUROC) and the full appendix table (every scenario × score)."""
    seg = r.get("analyses", {}).get("segmentation")
    if not seg:
        return None, None
    detection = seg["failure_detection"]
    full = Table(f"Dice-failure detection AUROC per scenario and score, {confidence_label(r)} bootstrap CIs.",
                 ["Scenario", "Score", "Failed / scored images", "AUROC"], name="failure_detection",
                 columns=["scenario", "score", "failures", "images", *estimate_columns("auroc")])
    compact = Table("Dice-failure detection where images fail: AUROC of the mean voxel entropy and of the best detector "
                    "(0.5 = chance).", ["Scenario", "Failed / scored", "Mean entropy", "Best detector"])
    for sid, scores in detection.items():
        for name, d in scores.items():
            full.rows.append(Row([sid, name, f"{d['failures']} / {d['images']}", fmt_ci(d["auroc"])],
                                 values=[sid, name, d["failures"], d["images"], *estimate_values(d["auroc"])]))
        entropy = scores.get("mean_entropy")
        detectors = {k: v for k, v in scores.items() if k != "mean_entropy" and value(v["auroc"]) is not None}
        if entropy is None or value(entropy["auroc"]) is None:
            continue  # no failures (or nothing but failures): nothing to separate
        best = max(detectors.items(), key=lambda kv: kv[1]["auroc"]["value"], default=None)
        compact.rows.append(Row([sid, f"{entropy['failures']} / {entropy['images']}", fmt_ci(entropy["auroc"]),
                                 "—" if best is None else f"{best[0]} {fmt_ci(best[1]['auroc'])}"]))
    return (compact if compact.rows else None), full


def overlays(r: dict[str, Any]) -> list[dict[str, str]]:
    """The overlays the audit drew (results.json ``assets``), best, median and worst clean Dice."""
    assets = r.get("assets", {})
    out = []
    for pos in OVERLAY_POSITIONS:
        png = assets.get(f"overlay_{pos}_png")
        if png is None:
            continue
        alt = assets.get(f"overlay_{pos}_alt", f"The {pos} clean sample under every perturbation.")
        out.append({"png": png, "alt": alt, "caption": (
            f"{alt} Each panel's number is that panel's Dice (mean over foreground classes), computed from the maps "
            "drawn: the sample was run again on its own, so a voxel on a knife-edge between classes can differ from the "
            "audit's batched pass. 3D images show the slice with the most reference foreground.")})
    return out


def segmentation_sections(r: dict[str, Any]) -> list[ReportSection]:
    if r.get("model", {}).get("task") != "segmentation":
        return []
    clean = clean_scenario(r)
    compact, full = failure_tables(r)
    seg = r.get("analyses", {}).get("segmentation", {})
    threshold = (f"An image fails when its Dice is below {fmt(seg['failure_threshold'])} "
                 f"({seg['failure_threshold_source']}).") if seg else ""
    headlines = []
    # the headline's worst is a realistic perturbation: stress tests (results.json robustness) are shown apart
    points = r.get("robustness", {}).get("breaking_points", {})
    worst = [w for w in _worst(r, "dice", len(points) + 1) if not points.get(w["perturbation"], {}).get("stress_test")][:1]
    if clean is not None and value(clean["metrics"].get("dice")) is not None:
        text = f"Dice {fmt_ci(clean['metrics']['dice'])} clean"
        if worst:
            text += f", {fmt(worst[0]['metrics']['dice']['value'])} at worst ({worst[0]['id']})"
        headlines.append(("Segmentation", text))
    return [ReportSection(
        id="segmentation", title="Segmentation", template=TEMPLATE, order=350,
        context={"dice": dice_figure(r), "voxels": voxel_reliability(r), "failures": compact, "threshold": threshold,
                 "overlays": overlays(r)},
        headlines=headlines, appendix=[full] if full is not None else [])]
