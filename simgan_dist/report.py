"""The evaluation report: `metrics.json`, PNG grids and one self-contained `report.html`.

Charts are inline SVG written here (no plotting dependency); pictures are PNGs next to
the page. Every file is written atomically (temporary name, then rename), so a reader
never sees half a report.
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from simgan_dist.core.imaging import grid, save_png


class Inputs(Protocol):
    """What the report reads of `evaluate.Inputs` (a protocol: report.py never imports evaluate.py)."""

    ids: np.ndarray
    synthetic: np.ndarray
    refined: np.ndarray
    real_test: np.ndarray

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
SAMPLES_PNG = "samples.png"
DIFFERENCE_PNG = "difference.png"
GRID_COLUMNS = 10
# Training metrics worth a panel each (their scales differ too much to share axes).
CURVE_KEYS = ["refiner/loss", "refiner/adv_loss", "refiner/reg_loss", "disc/loss", "disc/acc_real",
              "disc/acc_refined"]


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Pictures


def diverging(diff: np.ndarray, scale: float) -> np.ndarray:
    """Signed differences → RGB uint8: blue darker, white unchanged, red brighter; ±scale saturates."""
    v = np.clip(diff.astype(np.float32) / scale, -1.0, 1.0)[..., None]
    white = np.float32(255.0)
    red, blue = np.array([200, 30, 30], np.float32), np.array([30, 80, 200], np.float32)
    rgb = np.where(v > 0, white + v * (red - white), white - v * (blue - white))
    return np.rint(rgb).astype(np.uint8)


def _rgb(images: np.ndarray) -> np.ndarray:
    """N×H×W×1 → N×H×W×3 (uint16 depth scaled to 8 bits) so gray rows can share a grid with colour."""
    if images.dtype != np.uint8:
        lo, hi = float(images.min()), float(images.max())
        images = ((images.astype(np.float32) - lo) / max(hi - lo, 1.0) * 255).astype(np.uint8)
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def write_pictures(out: Path, data: Inputs, seed: int) -> dict[str, Any]:
    """samples.png (synthetic | refined | real rows) and difference.png (synthetic | refined | refined − synthetic;
    depth in mm where both maps have a reading)."""
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(data.ids), min(GRID_COLUMNS, len(data.ids)), replace=False))
    real = data.real_test[np.sort(rng.choice(len(data.real_test), min(GRID_COLUMNS, len(data.real_test)),
                                             replace=False))]
    synthetic, refined = data.synthetic[pick], data.refined[pick]
    save_png(grid([synthetic, refined, real]), out / SAMPLES_PNG)
    diff = refined.astype(np.float32).mean(-1) - synthetic.astype(np.float32).mean(-1)
    if synthetic.dtype == np.uint16:  # depth: compare readings only (a refined map stores its wall as 0)
        diff = np.where((synthetic > 0).all(-1) & (refined > 0).all(-1), diff, 0.0)
    scale = max(1.0, float(np.percentile(np.abs(diff), 99)))
    save_png(grid([_rgb(synthetic), _rgb(refined), diverging(diff, scale)]), out / DIFFERENCE_PNG)
    return {"ids": [str(i) for i in data.ids[pick]], "diff_scale": scale}


# ---------------------------------------------------------------------------------------------
# Charts


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round tick values covering [lo, hi]."""
    if not math.isfinite(lo) or not math.isfinite(hi) or hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if m * step >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def describe_change(relative_improvement: float) -> str:
    """0.3 → "30.0% lower"; -0.1 → "10.0% higher" (for errors, where lower is better)."""
    return f"{100 * abs(relative_improvement):.1f}% {'lower' if relative_improvement >= 0 else 'higher'}"


def _num(value: float | None, spec: str = ".2f") -> str:
    """A metric for the page; a statistic with nothing to measure (None) shows as a dash."""
    return "–" if value is None else format(value, spec)


def _fmt(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.2e}"


class _Axes:
    """Maps data coordinates into an SVG plot area and draws the frame, ticks and labels."""

    def __init__(self, title: str, xlim: tuple[float, float], ylim: tuple[float, float], xlabel: str,
                 width: int = 380, height: int = 230):
        self.w, self.h = width, height
        self.left, self.right, self.top, self.bottom = 52, 12, 24, 38
        self.x0, self.x1 = xlim if xlim[1] > xlim[0] else (xlim[0] - 1, xlim[0] + 1)
        self.y0, self.y1 = ylim if ylim[1] > ylim[0] else (ylim[0] - 1, ylim[0] + 1)
        self.parts = [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="10">',
            f'<text x="{width / 2}" y="14" text-anchor="middle" font-size="12">{html.escape(title)}</text>',
            f'<text x="{width / 2}" y="{height - 4}" text-anchor="middle">{html.escape(xlabel)}</text>',
        ]
        for t in _ticks(self.x0, self.x1):
            x = self.px(t)
            self.parts.append(f'<line x1="{x:.1f}" y1="{self.top}" x2="{x:.1f}" y2="{height - self.bottom}" '
                              'stroke="#eee"/>')
            self.parts.append(f'<text x="{x:.1f}" y="{height - self.bottom + 12}" text-anchor="middle">'
                              f'{_fmt(t)}</text>')
        for t in _ticks(self.y0, self.y1):
            y = self.py(t)
            self.parts.append(f'<line x1="{self.left}" y1="{y:.1f}" x2="{width - self.right}" y2="{y:.1f}" '
                              'stroke="#eee"/>')
            self.parts.append(f'<text x="{self.left - 4}" y="{y + 3:.1f}" text-anchor="end">{_fmt(t)}</text>')
        self.parts.append(f'<rect x="{self.left}" y="{self.top}" width="{width - self.left - self.right}" '
                          f'height="{height - self.top - self.bottom}" fill="none" stroke="#999"/>')

    def px(self, x: float) -> float:
        return self.left + (x - self.x0) / (self.x1 - self.x0) * (self.w - self.left - self.right)

    def py(self, y: float) -> float:
        return self.h - self.bottom - (y - self.y0) / (self.y1 - self.y0) * (self.h - self.top - self.bottom)

    def legend(self, names: list[str]) -> None:
        for i, name in enumerate(names):
            y = self.top + 12 + 13 * i
            x = self.w - self.right - 110
            self.parts.append(f'<line x1="{x}" y1="{y - 3}" x2="{x + 14}" y2="{y - 3}" '
                              f'stroke="{COLOURS[i % len(COLOURS)]}" stroke-width="2"/>')
            self.parts.append(f'<text x="{x + 18}" y="{y}">{html.escape(name)}</text>')

    def svg(self) -> str:
        return "".join(self.parts) + "</svg>"


def svg_lines(series: dict[str, tuple[list[float], list[float]]], title: str, xlabel: str) -> str:
    """One line per named (xs, ys) series, shared axes, a legend when there is more than one."""
    xs = [x for sx, _ in series.values() for x in sx]
    ys = [y for _, sy in series.values() for y in sy if math.isfinite(y)]
    if not xs or not ys:
        return f"<p>{html.escape(title)}: no data</p>"
    axes = _Axes(title, (min(xs), max(xs)), (min(ys), max(ys)), xlabel)
    for i, (sx, sy) in enumerate(series.values()):
        points = " ".join(f"{axes.px(x):.1f},{axes.py(y):.1f}" for x, y in zip(sx, sy, strict=True)
                          if math.isfinite(y))
        axes.parts.append(f'<polyline points="{points}" fill="none" stroke="{COLOURS[i % len(COLOURS)]}" '
                          'stroke-width="1.5"/>')
    if len(series) > 1:
        axes.legend(list(series))
    return axes.svg()


def svg_histogram(values: np.ndarray, title: str, xlabel: str, bins: int = 30,
                  marker: tuple[float, str] | None = None) -> str:
    """Bar histogram of `values`; `marker` = (x, label) draws a dashed reference line."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return f"<p>{html.escape(title)}: no data</p>"
    hi = max(float(np.percentile(values, 99.5)), marker[0] if marker else 0.0, 1e-6)
    counts, edges = np.histogram(np.clip(values, 0, hi), bins=bins, range=(0, hi))
    axes = _Axes(title, (0.0, hi), (0.0, float(counts.max())), xlabel)
    for count, lo_edge, hi_edge in zip(counts, edges[:-1], edges[1:], strict=True):
        x, y = axes.px(lo_edge), axes.py(count)
        axes.parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(axes.px(hi_edge) - x - 1, 0.5):.1f}" '
                          f'height="{axes.py(0) - y:.1f}" fill="{COLOURS[0]}"/>')
    if marker:
        x = axes.px(marker[0])
        axes.parts.append(f'<line x1="{x:.1f}" y1="{axes.top}" x2="{x:.1f}" y2="{axes.py(0):.1f}" '
                          'stroke="#d62728" stroke-dasharray="4 3"/>')
        axes.parts.append(f'<text x="{x + 3:.1f}" y="{axes.top + 10}" fill="#d62728">'
                          f'{html.escape(marker[1])}</text>')
    return axes.svg()


def error_cdf(errors: dict[str, np.ndarray], max_deg: float = 30.0) -> str:
    """Share of real test images within each angular error, per training set (the paper's Fig. 7 style)."""
    grid_deg = np.linspace(0, max_deg, 61)
    series = {name: (grid_deg.tolist(), [float((e <= d).mean() * 100) for d in grid_deg])
              for name, e in errors.items()}
    return svg_lines(series, "Real test images within error (%)", "angular error (degrees)")


# ---------------------------------------------------------------------------------------------
# The page

STYLE = """
body { font-family: sans-serif; max-width: 1180px; margin: 24px auto; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 18px; border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 28px; }
table { border-collapse: collapse; margin: 8px 0; } td, th { border: 1px solid #ccc; padding: 4px 10px; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.headline { font-size: 16px; background: #f6f9ff; padding: 10px 14px; border-left: 4px solid #1f77b4; }
.charts { display: flex; flex-wrap: wrap; gap: 10px; } .note { color: #555; font-size: 13px; }
img.pixel { image-rendering: pixelated; max-width: 100%; }
"""


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{c}</td>' if i else f"<td>{c}</td>" for i, c in enumerate(row)) + "</tr>"
        for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _gaze_section(metrics: dict[str, Any], errors: dict[str, np.ndarray]) -> str:
    gaze = metrics["gaze"]
    labels = {"synthetic": "Synthetic (raw)", "refined": "Refined (SimGAN)", "real": "Real (ceiling)"}
    model = {"gazenet": "The paper's gaze CNN", "small": "A small gaze CNN"}.get(gaze["model"], gaze["model"])
    rows = [[labels.get(name, name), f"{r['mean_deg']:.2f} ± {r['mean_deg_std']:.2f}", f"{r['median_deg']:.2f}",
             f"{100 * r['within_7deg']:.1f}%", ", ".join(str(s["best_epoch"]) for s in r["per_seed"]),
             f"{r['train_rows']:,}", f"{r['seconds']:.0f} s"]
            for name, r in gaze["variants"].items()]
    losses = {name: (list(range(1, len(r["loss_curve"]) + 1)), r["loss_curve"])
              for name, r in gaze["variants"].items()}
    test_rows = next(iter(gaze["variants"].values()))["test_rows"]
    per_seed = ", ".join(f"{100 * g:+.1f}%" for g in gaze["relative_improvement_per_seed"])
    return f"""
<h2 id="gaze">Downstream gaze estimation</h2>
<p>{model} trained on each set with seeds {gaze["seeds"]}, tested on {test_rows:,} labeled real test images
(no augmentation). Mean ± std over seeds.</p>
{_table(["Training data", "Mean error (°)", "Median error (°)", "Within 7°", "Epoch kept (per seed)",
         "Train images", "Time"], rows)}
<p>Refined vs synthetic, paired by seed: mean error <b>{describe_change(gaze["relative_improvement"])}</b>
(± {100 * gaze["relative_improvement_std"]:.1f}%; per seed {per_seed}),
<b>{100 * gaze["within_7deg_gain"]:+.1f}</b> points within 7° (the paper on MPIIGaze: about 30% and +22.3).</p>
<p class="note">Rule: {html.escape(gaze["rule"])}.</p>
<div class="charts">{error_cdf(errors)}{svg_lines(losses, "Gaze training loss (first seed)", "epoch")}</div>"""


def _pose_section(metrics: dict[str, Any], errors: dict[str, np.ndarray]) -> str:
    pose = metrics["hand_pose"]
    labels = {"synthetic": "Synthetic (raw)", "refined": "Refined (SimGAN)", "real": "Real (ceiling)"}
    rows = [[labels.get(name, name), f"{r['mean_px']:.2f} ± {r['mean_px_std']:.2f}", f"{r['median_px']:.2f}",
             f"{100 * r['within_5px']:.1f}%", ", ".join(str(s["best_epoch"]) for s in r["per_seed"]),
             f"{r['train_rows']:,}", f"{r['seconds']:.0f} s"]
            for name, r in pose["variants"].items()]
    curves = {labels.get(name, name): (pose["curve_px"], [100 * f for f in r["within_px_curve"]])
              for name, r in pose["variants"].items()}
    losses = {name: (list(range(1, len(r["loss_curve"]) + 1)), r["loss_curve"])
              for name, r in pose["variants"].items()}
    test_rows = next(iter(pose["variants"].values()))["test_rows"]
    per_seed = ", ".join(f"{100 * g:+.1f}%" for g in pose["relative_improvement_per_seed"])
    return f"""
<h2 id="hand-pose">Downstream hand pose estimation</h2>
<p>A small joint regressor trained on each set with seeds {pose["seeds"]}, tested on {test_rows:,} labeled real
test depth maps (no augmentation); {html.escape(pose["targets"])}. Mean ± std over seeds.</p>
{_table(["Training data", "Mean joint error (px)", "Median (px)", "Joints within 5 px", "Epoch kept (per seed)",
         "Train images", "Time"], rows)}
<p>Refined vs synthetic, paired by seed: mean joint error <b>{describe_change(pose["relative_improvement"])}</b>
(± {100 * pose["relative_improvement_std"]:.1f}%; per seed {per_seed}), <b>{100 * pose["within_5px_gain"]:+.1f}</b>
points of joints within 5 px (the paper on NYU, 224 px crops: 77.7% → 83.3% within 5 px).</p>
<p class="note">Rule: {html.escape(pose["rule"])}.</p>
<div class="charts">{svg_lines(curves, "Joints within distance (%)", "distance d (px)")}
{svg_lines(losses, "Pose training loss (first seed)", "epoch")}</div>"""


def _silhouette_section(p: dict[str, Any], shifts: np.ndarray) -> str:
    s, d = p["shift_px"], p["joint_depth_change_mm"]
    rows = [["Silhouette centroid shift, refined vs synthetic (px)", f"{_num(s['mean'])} ± {_num(s['std'])}",
             _num(s["median"]), _num(s["p95"])],
            ["Depth change at the joints (mm)", f"{_num(d['mean'])} ± {_num(d['std'])}", _num(d["median"]),
             _num(d["p95"])]]
    tolerance = p["tolerance_px"]
    return f"""
<h2 id="label-preservation">Label preservation</h2>
{_table(["Measure", "Mean ± std", "Median", "95th pct."], rows)}
<p>{_num(None if p["within_tolerance"] is None else 100 * p["within_tolerance"], ".1f")}% of {p["pairs"]:,} pairs
moved their silhouette at most {tolerance:.2f} px (the objective's tolerance); {100 * p["joints_lost"]:.1f}% of
joints with a synthetic reading have none after refinement.</p>
<p class="note">How: {html.escape(p["method"])}.</p>
<div class="charts">{svg_histogram(shifts, "Silhouette shift per pair", "shift (px)",
                                   marker=(tolerance, f"{tolerance:.2f} px"))}</div>"""


def _preservation_section(p: dict[str, Any], shifts: np.ndarray) -> str:
    s, within = p["shift_px"], p["within_1_5px"]
    rows = [["Pupil shift, refined vs synthetic (px)", f"{_num(s['mean'])} ± {_num(s['std'])}", _num(s["median"]),
             _num(s["p95"]), f"{p['pairs_counted']:,} of {p['pairs']:,}"]]
    for key, label in (("detector_error_px_synthetic", "Detector vs pupil_xy label, synthetic (px)"),
                       ("detector_error_px_real_test", "Detector vs pupil_xy label, real_test (px)")):
        if key in p:
            d = p[key]
            rows.append([label, f"{_num(d['mean'])} ± {_num(d['std'])}", _num(d["median"]), _num(d["p95"]),
                         f"found {100 * d['found_share']:.0f}%"])
    return f"""
<h2 id="label-preservation">Label preservation</h2>
{_table(["Measure", "Mean ± std", "Median", "95th pct.", "Pairs"], rows)}
<p>{_num(None if within is None else 100 * within, ".1f")}% of counted pairs moved at most 1.5 px
(the paper: 1.1 ± 0.8 px on a 55 px eye).</p>
<p class="note">How: {html.escape(p["method"])}. Counted: {html.escape(p["rule"])}. The real_test row is the
detector's own error on real-looking images (glints, blur, noise): a floor under any shift it reports.</p>
<div class="charts">{svg_histogram(shifts, "Pupil shift per pair", "shift (px)", marker=(1.5, "1.5 px"))}</div>"""


def _realism_section(r: dict[str, Any]) -> str:
    rows = [["Refined vs real", f"{r['refined_vs_real']:.4f}"], ["Synthetic vs real", f"{r['synthetic_vs_real']:.4f}"]]
    return f"""
<h2 id="realism">Realism</h2>
{_table(["Pair", "Kernel distance (lower = more real)"], rows)}
<p class="note">{html.escape(r["distance"])}; features: {html.escape(r["feature_space"])}; reference:
{html.escape(r["reference"])}; {r["samples"][0]:,} vs {r["samples"][1]:,} images, seed {r["seed"]}.
About 0 means indistinguishable in this feature space.</p>"""


def _artifacts_section(a: dict[str, Any]) -> str:
    labels = {"synthetic": "Synthetic", "refined": "Refined", "real": "Real (test)"}
    versus = a[f"vs_{a['reference']}"]
    rows = [[labels.get(name, name), f"{b['frame_score']:.2f}",
             _num(versus[name]["spectrum_log_distance"], ".3f") if name in versus else "–"]
            for name, b in a["border"].items()]
    rings = {labels.get(name, name): (list(range(len(b["ring_mean"]))), b["ring_mean"])
             for name, b in a["border"].items()}
    spectra = {labels.get(name, name): (s["frequency"], [math.log10(max(p, 1e-30)) for p in s["power"]])
               for name, s in a["spectrum"].items()}
    return f"""
<h2 id="artifacts">Artifacts: border frame and ripples</h2>
{_table(["Images", "Frame score (gray levels)", "Spectrum distance to real"], rows)}
<p>A frame shows as a ring profile that jumps a few pixels in from the edge (real eyes change smoothly
there); ripples show as spectrum power above real's at mid and high frequencies.</p>
<p class="note">How: {html.escape(a["method"])}.</p>
<div class="charts">{svg_lines(rings, "Mean gray level by ring", "pixels in from the edge")}
{svg_lines(spectra, "Radial power spectrum (log10, unit sum)", "frequency (cycles/px)")}</div>"""


def _samples_section(pictures: dict[str, Any], refinement: dict[str, float]) -> str:
    if "mean_abs_change_mm" in refinement:
        unit, brighter, darker = "mm", "farther", "nearer"
        change = f"{refinement['mean_abs_change_mm']:.1f} mm where both maps have a reading"
    else:
        unit, brighter, darker = "gray levels", "brighter", "darker"
        change = f"{refinement['mean_abs_change_gray_levels']:.1f} gray levels"
    return f"""
<h2 id="samples">Samples</h2>
<p>Rows: synthetic | refined (the same images) | real (held-out test images).</p>
<img class="pixel" src="{SAMPLES_PNG}" alt="synthetic, refined and real images">
<p>Rows: synthetic | refined | refined − synthetic (red {brighter}, blue {darker}, saturating at
±{pictures["diff_scale"]:.0f} {unit}). Mean absolute change over the realism sample: {change}.</p>
<img class="pixel" src="{DIFFERENCE_PNG}" alt="difference maps">"""


def _training_section(curves: list[dict[str, Any]], run: str | None) -> str:
    if not curves:
        why = "no training run given (pass --run RUN_FOLDER)" if not run else f"{run}/metrics.jsonl is empty"
        return f'\n<h2 id="training">Training curves</h2>\n<p class="note">No loss curves: {html.escape(why)}.</p>'
    charts = []
    for key in CURVE_KEYS:
        points = [(c["step"], c[key]) for c in curves if isinstance(c.get(key), (int, float))]
        if points:
            xs, ys = zip(*points, strict=True)
            charts.append(svg_lines({key: (list(xs), list(ys))}, key, "step"))
    return f"""
<h2 id="training">Training curves</h2>
<p class="note">From {html.escape(str(run))}/metrics.jsonl ({len(curves)} reports).</p>
<div class="charts">{"".join(charts)}</div>"""


def render_html(metrics: dict[str, Any], errors: dict[str, np.ndarray], shifts: np.ndarray,
                curves: list[dict[str, Any]], pictures: dict[str, Any]) -> str:
    h = metrics["headline"]
    inputs = metrics["inputs"]
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in inputs["notes"])
    sources = _table(["Input", "URI"], [[k, html.escape(str(inputs[k]))]
                                          for k in ("synthetic", "refined", "real_test", "real", "run") if inputs[k]])
    cap = inputs["max_train_rows"]
    real = (f" and {inputs['real_rows']:,} of {inputs['corpus_real_rows']:,} labeled real rows"
            if inputs["real_rows"] is not None else "")
    sources += (f"<p class='note'>Estimators trained on {inputs['pairs']:,} of {inputs['corpus_pairs']:,} "
                f"synthetic/refined pairs{real} (evaluate.max_train_rows = {f'{cap:,}' if cap else '0, every row'}; "
                "a subsample takes the same ids on both sides, those of smallest id hash).</p>")
    if metrics["kind"] == "eye":
        headline = (f'Gaze error on real images: <b>{h["gaze_error_synthetic_deg"]:.2f}°</b> trained on synthetic → '
                    f'<b>{h["gaze_error_refined_deg"]:.2f}°</b> trained on refined '
                    f'({describe_change(h["relative_improvement"])} ± {100 * h["relative_improvement_std"]:.1f}% over '
                    f'{h["gaze_seeds"]} seeds). Pupil shift {_num(h["pupil_shift_px"])} px.')
        sections = (_gaze_section(metrics, errors) + _preservation_section(metrics["label_preservation"], shifts)
                    + _realism_section(metrics["realism"]) + _artifacts_section(metrics["artifacts"]))
    else:
        headline = (f'Hand joint error on real depth maps: <b>{h["joint_error_synthetic_px"]:.2f} px</b> trained on '
                    f'synthetic → <b>{h["joint_error_refined_px"]:.2f} px</b> trained on refined '
                    f'({describe_change(h["relative_improvement"])} ± {100 * h["relative_improvement_std"]:.1f}% over '
                    f'{h["pose_seeds"]} seeds). Silhouette shift {_num(h["silhouette_shift_px"])} px.')
        sections = (_pose_section(metrics, errors) + _silhouette_section(metrics["label_preservation"], shifts)
                    + _realism_section(metrics["realism"]))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>SimGAN evaluation</title><style>{STYLE}</style></head><body>
<h1>SimGAN evaluation</h1>
<p class="headline">{headline} Realism distance {h["realism_synthetic"]:.4f} → {h["realism_refined"]:.4f}
(lower = more real).</p>
{sources}{f"<ul class='note'>{notes}</ul>" if notes else ""}
{sections}
{_samples_section(pictures, metrics["refinement"])}
{_training_section(curves, inputs["run"])}
<p class="note">Machine-readable: <a href="metrics.json">metrics.json</a>. {metrics["seconds"]:.0f} s.</p>
</body></html>
"""


def write_report(out: str | Path, metrics: dict[str, Any], data: Inputs, errors: dict[str, np.ndarray],
                 shifts: np.ndarray, curves: list[dict[str, Any]], seed: int = 0) -> Path:
    """Write the PNGs, `metrics.json` and then `report.html` (last: its presence means a complete report)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pictures = write_pictures(out, data, seed)
    metrics["samples"] = pictures
    write_atomic(out / "metrics.json", json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    path = out / "report.html"
    write_atomic(path, render_html(metrics, errors, shifts, curves, pictures))
    return path
