//! Plots of runs as PNG and SVG (plotters, with the DejaVu font bundled so
//! that nothing depends on the machine's fonts).
//!
//! One figure per group and x axis (training steps, seconds of training):
//! a panel per metric, one curve per label (the objective), the mean over
//! seeds with the range between the lowest and highest seed shaded, and
//! the task's threshold for the metric as a dashed line. One legend under
//! the title serves every panel. Seeds are aligned report by report
//! (suites report at fixed step intervals); against seconds, a report's
//! x is the mean of its seeds' seconds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Once;

use anyhow::{Context, anyhow};
use flgfn_common::env::Quality;
use plotters::coord::Shift;
use plotters::coord::ranged1d::ValueFormatter;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::results::TOP_K_FRACTION;
use super::{RunResult, RunSpec};
use crate::report::Report;

/// A metric drawn in one panel.
pub(super) struct Metric {
    pub(super) title: &'static str,
    value: fn(&Report) -> Option<f64>,
    log_scale: bool,
    /// The value a run must reach to count, drawn as a dashed line.
    threshold: Threshold,
}

/// What a metric is judged against.
#[derive(Clone, Copy)]
enum Threshold {
    /// Nothing: the metric is not judged.
    None,
    /// A quality threshold of the run's task.
    Quality(fn(&Quality) -> Option<f64>),
    /// [`TOP_K_FRACTION`] of the run's exact top-100 ceiling.
    TopKCeiling,
}

impl Threshold {
    /// Its value for `run`, where the run's task has one.
    fn of(self, run: &RunResult) -> Option<f64> {
        match self {
            Threshold::None => None,
            Threshold::Quality(value) => run.quality.as_ref().and_then(value),
            Threshold::TopKCeiling => run.top_k_ceiling.map(|c| TOP_K_FRACTION * c),
        }
    }
}

pub(super) const METRICS: [Metric; 9] = [
    Metric {
        title: "loss",
        // 0 where every step since the previous report was skipped (not
        // finite): no loss, not the best one.
        value: |r| (r.loss != 0.0 || r.skipped_batches == 0).then_some(r.loss),
        log_scale: true,
        threshold: Threshold::None,
    },
    Metric {
        title: "|log Z error| (flow head or TB)",
        value: Report::logz_error,
        log_scale: true,
        threshold: Threshold::Quality(|q| Some(q.log_z_error)),
    },
    Metric {
        title: "marginal TV",
        value: |r| r.marginal_tv,
        log_scale: true,
        threshold: Threshold::Quality(|q| q.marginal_tv),
    },
    Metric {
        title: "energy W1",
        value: |r| r.energy_w1,
        log_scale: true,
        threshold: Threshold::Quality(|q| q.energy_w1),
    },
    Metric {
        title: "exact TV of the sampler",
        value: |r| r.exact_tv,
        log_scale: true,
        threshold: Threshold::Quality(|q| q.exact_tv),
    },
    Metric {
        title: "top-100 mean reward (this evaluation)",
        value: |r| Some(r.top100_mean_reward_eval),
        log_scale: false,
        // (One evaluation's samples rarely hold the 100 best: the
        // ceiling is judged on the cumulative figure, below.)
        threshold: Threshold::None,
    },
    Metric {
        // What the tables' steps to the top-100 ceiling are read from.
        title: "top-100 mean reward (every evaluation so far)",
        value: |r| Some(r.top100_mean_reward),
        log_scale: false,
        threshold: Threshold::TopKCeiling,
    },
    Metric {
        title: "trained transitions per second",
        value: |r| Some(r.trained_per_s),
        log_scale: false,
        threshold: Threshold::None,
    },
    Metric {
        title: "mean policy lag (steps)",
        value: |r| Some(r.mean_policy_lag),
        log_scale: false,
        threshold: Threshold::None,
    },
];

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// A short axis label: at most 3 significant digits, scientific notation
/// for very large or small magnitudes.
fn compact(value: f64) -> String {
    // "1.50" -> "1.5", "2.00" -> "2"; "200" stays.
    let trimmed = |digits: &str| {
        if digits.contains('.') {
            digits
                .trim_end_matches('0')
                .trim_end_matches('.')
                .to_owned()
        } else {
            digits.to_owned()
        }
    };
    let magnitude = value.abs();
    if value == 0.0 {
        "0".to_owned()
    } else if !(1e-3..1e5).contains(&magnitude) {
        // Three significant digits, as below: ticks 5,000 apart at 1.2e5
        // must not read alike.
        let text = format!("{value:.2e}");
        match text.split_once('e') {
            Some((mantissa, exponent)) => format!("{}e{exponent}", trimmed(mantissa)),
            None => text,
        }
    } else {
        let decimals = (2 - magnitude.log10().floor() as i32).max(0) as usize;
        trimmed(&format!("{value:.decimals$}"))
    }
}

/// Registers the bundled font once per process.
fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Only fails on a malformed font, and the bytes are fixed.
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
}

/// A figure's x axis: file suffix, axis label, value of a report.
type Axis = (&'static str, &'static str, fn(&Report) -> f64);

/// Each group's figures: one per axis (file suffix, label, x of a
/// report), each as PNG and SVG.
const AXES: [Axis; 2] = [
    ("steps", "training steps", |r| r.step as f64),
    ("seconds", "seconds of training", |r| r.wall_s),
];
const FIGURE_EXTENSIONS: [&str; 2] = ["png", "svg"];

/// (x, mean, low, high) per report index, over the runs of one curve.
pub(super) type Band = Vec<(f64, f64, f64, f64)>;

/// One curve of a figure: its colour (the label's place among every
/// label of the results, so that an objective keeps its colour from
/// figure to figure), label and runs.
pub(super) type Curve<'a> = (usize, String, Vec<&'a RunResult>);

/// Mean and range over seeds of `metric` against `x`, aligned by report
/// index; points where any seed lacks the metric are left out, and so are
/// saturated figures (`f64::MAX`, a diverged run's energy W1 or top-k
/// reward), which would stretch the axis past f64's range.
fn band(runs: &[&RunResult], x: fn(&Report) -> f64, metric: fn(&Report) -> Option<f64>) -> Band {
    let len = runs.iter().map(|r| r.reports.len()).min().unwrap_or(0);
    (0..len)
        .filter_map(|i| {
            let values: Option<Vec<f64>> = runs
                .iter()
                .map(|r| metric(&r.reports[i]).filter(|v| v.abs() < f64::MAX))
                .collect();
            let values = values?;
            let xs: f64 = runs.iter().map(|r| x(&r.reports[i])).sum::<f64>() / runs.len() as f64;
            let mean = values.iter().sum::<f64>() / values.len() as f64;
            let low = values.iter().copied().fold(f64::INFINITY, f64::min);
            let high = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            Some((xs, mean, low, high))
        })
        .collect()
}

/// The panels of a figure: each metric some curve has a value of, with
/// the threshold its runs share ([`shared_threshold`]).
pub(super) fn panels(
    curves: &[Curve<'_>],
    x: fn(&Report) -> f64,
) -> Vec<(&'static Metric, Option<f64>)> {
    METRICS
        .iter()
        .filter(|m| {
            curves
                .iter()
                .any(|(_, _, runs)| !band(runs, x, m.value).is_empty())
        })
        .map(|m| (m, shared_threshold(curves, m)))
        .collect()
}

/// The legend's words for the dashed lines `panels` draw, if any.
fn threshold_legend(panels: &[(&Metric, Option<f64>)]) -> Option<String> {
    let drawn = |ceiling: bool| {
        panels.iter().any(|(m, threshold)| {
            threshold.is_some() && matches!(m.threshold, Threshold::TopKCeiling) == ceiling
        })
    };
    let ceiling = format!(
        "{:.0} % of the exact top-100 ceiling",
        100.0 * TOP_K_FRACTION
    );
    match (drawn(false), drawn(true)) {
        (true, true) => Some(format!("quality threshold; {ceiling}")),
        (true, false) => Some("quality threshold".to_owned()),
        (false, true) => Some(ceiling),
        (false, false) => None,
    }
}

/// Whether a threshold at `threshold` can share a linear axis with curves
/// spanning `data` (lowest, highest, ..) without squashing them: within
/// one span of them, the span at least half the highest value's size.
pub(super) fn within_reach(threshold: f64, (low, high, _): (f64, f64, f64)) -> bool {
    let span = (high - low).max(0.5 * low.abs().max(high.abs()));
    (low - span..=high + span).contains(&threshold)
}

/// `metric`'s threshold where every run of the figure has the same one (a
/// figure's runs share a task; runs of different tasks get no line).
pub(super) fn shared_threshold(curves: &[Curve<'_>], metric: &Metric) -> Option<f64> {
    let mut thresholds = curves
        .iter()
        .flat_map(|(_, _, runs)| runs.iter().map(|run| metric.threshold.of(run)));
    let first = thresholds.next()??;
    (first.is_finite() && thresholds.all(|t| t == Some(first))).then_some(first)
}

/// The y values a panel must show: (lowest, highest, smallest above 0) of
/// its bands and its threshold, so that the threshold's line is always in
/// view, however far the curves are from it. `None` without a value.
pub(super) fn y_extent(
    bands: &[(usize, &String, Band)],
    threshold: Option<f64>,
) -> Option<(f64, f64, f64)> {
    let values = bands
        .iter()
        .flat_map(|(_, _, band)| band.iter())
        .flat_map(|&(_, mean, lo, hi)| [lo, mean, hi])
        .chain(threshold);
    let (mut low, mut high, mut smallest_positive) =
        (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY);
    for value in values {
        low = low.min(value);
        high = high.max(value);
        if value > 0.0 {
            smallest_positive = smallest_positive.min(value);
        }
    }
    low.is_finite().then_some((low, high, smallest_positive))
}

/// Height of one row of the legend, in pixels.
const LEGEND_ROW: u32 = 26;
/// Length of an entry's line sample, in pixels.
const LEGEND_MARK: u32 = 26;
/// Space between an entry's line sample and its label, in pixels.
const LEGEND_PAD: u32 = 6;
/// Space between two entries, in pixels.
const LEGEND_GAP: u32 = 30;
/// Space kept free at each side of the legend, in pixels.
const LEGEND_MARGIN: u32 = 20;
/// A threshold's dashes: drawn, then left out, in pixels.
const DASH: (u32, u32) = (8, 6);

/// The dashed line of a threshold.
fn threshold_style() -> ShapeStyle {
    BLACK.mix(0.6).stroke_width(2)
}

/// One entry of a figure's legend: a curve's colour, or `None` for the
/// dashed threshold line.
type LegendEntry = (Option<RGBColor>, String);

/// Where each legend entry of `widths` pixels goes: (x, row), entries in
/// order, in rows no wider than `width` (an entry wider than that alone in
/// its row), each row centred.
fn legend_layout(widths: &[u32], width: u32) -> Vec<(u32, u32)> {
    let mut rows: Vec<Vec<usize>> = Vec::new();
    let mut used = 0;
    for (i, &entry) in widths.iter().enumerate() {
        match rows.last_mut() {
            Some(row) if used + LEGEND_GAP + entry <= width => {
                row.push(i);
                used += LEGEND_GAP + entry;
            }
            _ => {
                rows.push(vec![i]);
                used = entry;
            }
        }
    }
    let mut places = vec![(0, 0); widths.len()];
    for (row_index, row) in rows.iter().enumerate() {
        let total = row.iter().map(|&i| widths[i] + LEGEND_GAP).sum::<u32>() - LEGEND_GAP;
        let mut x = width.saturating_sub(total) / 2;
        for &i in row {
            places[i] = (x, row_index as u32);
            x += widths[i] + LEGEND_GAP;
        }
    }
    places
}

/// Draws the legend `entries` at `places` (from [`legend_layout`]).
fn draw_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    entries: &[LegendEntry],
    places: &[(u32, u32)],
    font: &TextStyle<'_>,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let font = font.pos(Pos::new(HPos::Left, VPos::Center));
    for ((colour, label), &(x, row)) in entries.iter().zip(places) {
        let (x, y) = (x as i32, (row * LEGEND_ROW + LEGEND_ROW / 2) as i32);
        let end = x + LEGEND_MARK as i32;
        match colour {
            Some(colour) => area.draw(&PathElement::new(
                vec![(x, y), (end, y)],
                colour.stroke_width(3),
            ))?,
            None => {
                let (on, off) = (DASH.0 as i32, DASH.1 as i32);
                for start in (x..end).step_by((on + off) as usize) {
                    area.draw(&PathElement::new(
                        vec![(start, y), ((start + on).min(end), y)],
                        threshold_style(),
                    ))?;
                }
            }
        }
        area.draw(&Text::new(
            label.clone(),
            (end + LEGEND_PAD as i32, y),
            font.clone(),
        ))?;
    }
    Ok(())
}

/// Draws every panel of one figure on `root`, under its title and one
/// legend for all of them (a legend in each panel covered its curves).
fn draw_figure<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    x_label: &str,
    curves: &[Curve<'_>],
    x: fn(&Report) -> f64,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let error = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing failed: {e:?}");
    root.fill(&WHITE).map_err(error)?;
    let metrics = panels(curves, x);
    // Each panel's bands, their extent, and the threshold drawn in it: one
    // far from the curves on a linear axis would squash them (top-100
    // rewards of 1e4 to 1e5 under a ceiling of 9e5), and is named under
    // the panel instead, so the legend names only thresholds drawn.
    let prepared: Vec<_> = metrics
        .iter()
        .map(|&(metric, threshold)| {
            // (A curve with nothing in this panel is left out of it.)
            let bands: Vec<(usize, &String, Band)> = curves
                .iter()
                .map(|(colour, label, runs)| (*colour, label, band(runs, x, metric.value)))
                .filter(|(_, _, band)| !band.is_empty())
                .collect();
            let data = y_extent(&bands, None);
            let in_view = data
                .and_then(|data| threshold.filter(|&t| metric.log_scale || within_reach(t, data)));
            (metric, threshold, bands, data, in_view)
        })
        .collect();
    let drawn: Vec<(&Metric, Option<f64>)> = prepared
        .iter()
        .map(|&(metric, _, _, _, in_view)| (metric, in_view))
        .collect();
    let root = root.titled(title, ("sans-serif", 22)).map_err(error)?;
    let mut entries: Vec<LegendEntry> = curves
        .iter()
        .map(|(colour, label, _)| (Some(PALETTE[colour % PALETTE.len()]), label.clone()))
        .collect();
    if let Some(label) = threshold_legend(&drawn) {
        entries.push((None, label));
    }
    let font = TextStyle::from(("sans-serif", 16).into_font());
    let widths = entries
        .iter()
        .map(|(_, label)| {
            let (text, _) = root.estimate_text_size(label, &font)?;
            Ok(LEGEND_MARK + LEGEND_PAD + text)
        })
        .collect::<Result<Vec<u32>, _>>()
        .map_err(error)?;
    let width = root.dim_in_pixel().0;
    let places = legend_layout(&widths, width.saturating_sub(2 * LEGEND_MARGIN));
    let rows = places.iter().map(|&(_, row)| row + 1).max().unwrap_or(0);
    let (legend, root) = root.split_vertically(rows * LEGEND_ROW + 4);
    let places: Vec<(u32, u32)> = places
        .iter()
        .map(|&(x, row)| (x + LEGEND_MARGIN, row))
        .collect();
    draw_legend(&legend, &entries, &places, &font).map_err(error)?;
    let columns = 3usize;
    let rows = metrics.len().div_ceil(columns).max(1);
    let panels = root.split_evenly((rows, columns));
    for (panel, (metric, threshold, bands, data, in_view)) in panels.iter().zip(prepared) {
        let x_max = bands
            .iter()
            .flat_map(|(_, _, b)| b.iter())
            .fold(0f64, |max, &(px, ..)| max.max(px));
        let Some(data) = data else {
            continue;
        };
        let off_panel = threshold.filter(|_| in_view.is_none());
        // The smallest value above 0: a log axis starts below it, so no
        // curve is clipped but one that reaches 0.
        let (y_min, y_max, smallest_positive) = y_extent(&bands, in_view).unwrap_or(data);
        let x_range = 0f64..x_max.max(1e-9) * 1.02;
        let mut builder = ChartBuilder::on(panel);
        builder
            .caption(metric.title, ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(32)
            .y_label_area_size(56);
        let floor = if smallest_positive.is_finite() {
            smallest_positive
        } else {
            1e-9
        };
        let lo = y_min.max(floor) * 0.8;
        let hi = (y_max * 1.25).max(lo * 2.0);
        // A log axis is labelled at powers of ten only: within less than a
        // decade it would carry no label at all, so such a panel is linear.
        if metric.log_scale && hi / lo >= 10.0 {
            let (lo, hi, labels) = log_axis(lo, hi);
            let chart = builder
                .build_cartesian_2d(x_range, (lo..hi).log_scale())
                .map_err(error)?;
            draw_panel(chart, x_label, &bands, in_view, lo, labels).map_err(error)?;
        } else {
            let pad = ((y_max - y_min) * 0.05).max(1e-9);
            let chart = builder
                .build_cartesian_2d(x_range, (y_min - pad)..(y_max + pad))
                .map_err(error)?;
            // (Said under the axis, where no curve is.)
            let x_label = match off_panel {
                Some(threshold) => format!(
                    "{x_label}; threshold {}, {} the panel",
                    compact(threshold),
                    if threshold > y_max { "above" } else { "below" }
                ),
                None => x_label.to_owned(),
            };
            draw_panel(
                chart,
                &x_label,
                &bands,
                in_view,
                f64::NEG_INFINITY,
                LINEAR_Y_LABELS,
            )
            .map_err(error)?;
        }
    }
    root.present().map_err(error)?;
    Ok(())
}

/// Labels on a linear y axis (plotters' default).
const LINEAR_Y_LABELS: usize = 10;

/// Most labels on a log y axis: a panel is a third of the figure wide
/// and a row of it high, and more than this many crowd into each other.
const MAX_LOG_Y_LABELS: usize = 7;

/// A log axis over `lo..hi` widened to whole decades, and how many labels
/// to ask plotters for: it labels the powers of ten, and where asked for
/// more labels than there are decades it labels 2, 3, ... 9 times each as
/// well, which crowd together at the top of every decade. So: one per
/// decade (every other one, and so on, past [`MAX_LOG_Y_LABELS`]), and
/// both ends a labelled power of ten, so that no decade is left without
/// a number.
fn log_axis(lo: f64, hi: f64) -> (f64, f64, usize) {
    let (low, high) = (lo.log10().floor(), hi.log10().ceil());
    // Just outside the powers of ten, so that rounding cannot drop them.
    let lo = 10f64.powf(low) * (1.0 - 1e-9);
    let hi = 10f64.powf(high) * (1.0 + 1e-9);
    let decades = (high - low).max(1.0) as usize;
    (lo, hi, (decades + 1).min(MAX_LOG_Y_LABELS))
}

/// Axes, every curve (values clamped at `floor`, for log axes) and the
/// threshold's dashed line of one panel, with at most `y_labels` labels
/// on the y axis.
fn draw_panel<'a, DB: DrawingBackend + 'a, Y>(
    mut chart: ChartContext<'a, DB, Cartesian2d<RangedCoordf64, Y>>,
    x_label: &str,
    bands: &[(usize, &String, Band)],
    threshold: Option<f64>,
    floor: f64,
    y_labels: usize,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>>
where
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    chart
        .configure_mesh()
        .y_labels(y_labels)
        .x_desc(x_label)
        .x_label_formatter(&|v| compact(*v))
        .y_label_formatter(&|v| compact(*v))
        .light_line_style(WHITE)
        .draw()?;
    for (i, _, points) in bands {
        draw_curve(&mut chart, *i, points, floor)?;
    }
    if let Some(threshold) = threshold {
        let x_end = chart.x_range().end;
        chart.draw_series(DashedLineSeries::new(
            [(0.0, threshold), (x_end, threshold)],
            DASH.0,
            DASH.1,
            threshold_style(),
        ))?;
    }
    Ok(())
}

/// The seed range as a shaded polygon, then the mean as a line.
fn draw_curve<DB: DrawingBackend, X, Y>(
    chart: &mut ChartContext<'_, DB, Cartesian2d<X, Y>>,
    index: usize,
    points: &Band,
    floor: f64,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    let color = PALETTE[index % PALETTE.len()];
    let clamp = |v: f64| v.max(floor);
    if points.len() > 1 {
        let mut outline: Vec<(f64, f64)> =
            points.iter().map(|&(x, _, lo, _)| (x, clamp(lo))).collect();
        outline.extend(points.iter().rev().map(|&(x, _, _, hi)| (x, clamp(hi))));
        chart.draw_series(std::iter::once(Polygon::new(
            outline,
            color.mix(0.18).filled(),
        )))?;
    }
    chart.draw_series(LineSeries::new(
        points.iter().map(|&(x, mean, _, _)| (x, clamp(mean))),
        color.stroke_width(2),
    ))?;
    Ok(())
}

/// Renders, for every group of `results`, a figure against training steps
/// and one against seconds, each as PNG and SVG, into `dir`; a curve of
/// the group whose every run is in `failed` is named in its title (it has
/// no line). Returns the files written.
pub fn render_groups(
    results: &[RunResult],
    failed: &[RunSpec],
    dir: &Path,
) -> anyhow::Result<Vec<PathBuf>> {
    register_font();
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // Labels in suite order (each at its first configuration's place).
    let mut labels: Vec<(&str, usize)> = Vec::new();
    for result in results {
        let (curve, position) = (result.spec.curve.as_str(), result.spec.position);
        match labels.iter_mut().find(|(label, _)| *label == curve) {
            Some((_, first)) => *first = (*first).min(position),
            None => labels.push((curve, position)),
        }
    }
    labels.sort_by_key(|&(_, position)| position);
    let colour = |curve: &str| labels.iter().position(|(l, _)| *l == curve).unwrap_or(0);
    let mut groups: BTreeMap<&str, Vec<Curve<'_>>> = BTreeMap::new();
    for result in results {
        let curves = groups.entry(result.spec.group.as_str()).or_default();
        match curves
            .iter_mut()
            .find(|(_, label, _)| *label == result.spec.curve)
        {
            Some((_, _, runs)) => runs.push(result),
            None => curves.push((
                colour(&result.spec.curve),
                result.spec.curve.clone(),
                vec![result],
            )),
        }
    }
    let mut written = Vec::new();
    for (group, curves) in &mut groups {
        let stem: String = group
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let seeds = curves.iter().map(|(_, _, r)| r.len()).max().unwrap_or(0);
        let uneven = curves.iter().any(|(_, _, r)| r.len() != seeds);
        // Curves with fewer finished seeds than others (failed runs) say so
        // in their label: the title's count would be the largest one's.
        if uneven {
            for (_, label, runs) in curves.iter_mut() {
                let n = runs.len();
                *label = format!("{label} ({n} seed{})", if n == 1 { "" } else { "s" });
            }
        }
        let title = match (seeds, uneven) {
            (1, false) => format!("{group}: one run per curve"),
            (_, false) => format!("{group}: mean and range over {seeds} seeds"),
            (_, true) => format!("{group}: mean and range over the seeds in each label"),
        };
        // A curve with no finished run has no line, nor a label: said.
        let mut lost: Vec<&RunSpec> = failed
            .iter()
            .filter(|spec| spec.group == *group)
            .filter(|spec| {
                !curves
                    .iter()
                    .flat_map(|(_, _, runs)| runs)
                    .any(|run| run.spec.curve == spec.curve)
            })
            .collect();
        lost.sort_by_key(|spec| spec.position);
        lost.dedup_by(|a, b| a.curve == b.curve);
        let title = if lost.is_empty() {
            title
        } else {
            let names: Vec<&str> = lost.iter().map(|spec| spec.curve.as_str()).collect();
            format!("{title}; every run failed: {}", names.join(", "))
        };
        let curves = &*curves;
        for (suffix, x_label, x) in AXES {
            let size = (1500, 900);
            let png = dir.join(format!("{stem}-{suffix}.png"));
            drawn_whole(&png, |part| {
                draw_figure(
                    &BitMapBackend::new(part, size).into_drawing_area(),
                    &title,
                    x_label,
                    curves,
                    x,
                )
            })?;
            let svg = dir.join(format!("{stem}-{suffix}.svg"));
            drawn_whole(&svg, |part| {
                draw_figure(
                    &SVGBackend::new(part, size).into_drawing_area(),
                    &title,
                    x_label,
                    curves,
                    x,
                )
            })?;
            written.push(png);
            written.push(svg);
        }
    }
    Ok(written)
}

/// Removes the figures in `dir` (files named as [`render_groups`] names
/// them) that are not among `written`; other files stay.
pub fn remove_figures_except(dir: &Path, written: &[PathBuf]) -> anyhow::Result<()> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let figure = AXES.iter().any(|(suffix, ..)| {
            FIGURE_EXTENSIONS
                .iter()
                .any(|ext| name.ends_with(&format!("-{suffix}.{ext}")))
        });
        if figure && path.is_file() && !written.contains(&path) {
            std::fs::remove_file(&path)
                .with_context(|| format!("cannot remove {}", path.display()))?;
        }
    }
    Ok(())
}

/// Draws into a part file beside `path` (same extension: the backend picks
/// the format by it), syncs it and renames it there, as the tables are
/// written: a runner killed while drawing, or a machine that crashes after,
/// leaves the previous figure, not half of one.
fn drawn_whole(path: &Path, draw: impl FnOnce(&Path) -> anyhow::Result<()>) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow!("no file name in {}", path.display()))?;
    let part = path.with_file_name(format!(".part-{name}"));
    let drawn = draw(&part).and_then(|()| {
        std::fs::File::open(&part)
            .and_then(|file| file.sync_all())
            .with_context(|| format!("cannot sync {}", part.display()))?;
        std::fs::rename(&part, path)
            .with_context(|| format!("cannot rename {} to {}", part.display(), path.display()))?;
        if let Some(folder) = crate::durable_file::parent_of(path) {
            crate::durable_file::sync_folder(folder)?;
        }
        Ok(())
    });
    if drawn.is_err() {
        let _ = std::fs::remove_file(&part);
    }
    drawn
}

#[cfg(test)]
mod tests {
    use plotters::prelude::*;

    use super::{LEGEND_GAP, MAX_LOG_Y_LABELS, compact, legend_layout, log_axis};

    /// The values plotters labels on a log axis built by [`log_axis`].
    fn labelled(lo: f64, hi: f64) -> Vec<f64> {
        let (lo, hi, labels) = log_axis(lo, hi);
        let axis: LogCoord<f64> = (lo..hi).log_scale().into();
        axis.key_points(labels)
    }

    /// A diverged run's saturated figure is no point: it would stretch
    /// the axis past f64's range.
    #[test]
    fn saturated_figures_are_left_out_of_a_band() {
        use crate::experiment::results::RunResult;
        use crate::report::Report;
        let report = |step: u64, energy_w1: f64| Report {
            step,
            energy_w1: Some(energy_w1),
            ..Report::default()
        };
        let run = RunResult {
            spec: crate::experiment::suite("smoke")
                .unwrap()
                .runs(1, Some(300))[0]
                .clone(),
            reports: vec![report(100, 0.5), report(200, f64::MAX), report(300, 0.25)],
            to_quality: None,
            to_top_k: None,
            top_k_ceiling: None,
            quality: None,
            record: Default::default(),
        };
        let points = super::band(&[&run], |r| r.step as f64, |r| r.energy_w1);
        let steps: Vec<f64> = points.iter().map(|&(x, ..)| x).collect();
        assert_eq!(steps, [100.0, 300.0]);
    }

    #[test]
    fn log_axes_label_every_decade_and_nothing_between() {
        let close = |got: &[f64], want: &[f64]| {
            got.len() == want.len()
                && got
                    .iter()
                    .zip(want)
                    .all(|(g, w)| ((g - w) / w).abs() < 1e-9)
        };
        // Within one decade of powers of ten, plotters labelled 2, 3, ...
        // 9 times each as well (0.08 and 0.09 overlapped), and nothing
        // below the first power of ten above the lowest value.
        let got = labelled(0.008, 0.5);
        assert!(close(&got, &[1e-3, 1e-2, 1e-1, 1.0]), "{got:?}");
        let got = labelled(0.02, 0.9);
        assert!(close(&got, &[1e-2, 1e-1, 1.0]), "{got:?}");
        // Many decades: every other one, each a power of ten.
        let got = labelled(1e-9, 500.0);
        assert!(got.len() <= MAX_LOG_Y_LABELS && got.len() >= 4, "{got:?}");
        for value in &got {
            let exponent = value.log10();
            assert!((exponent - exponent.round()).abs() < 1e-9, "{got:?}");
        }
    }

    /// Legend entries stay in order, never overlap, and wrap into more
    /// rows (each centred) where one is not wide enough.
    #[test]
    fn legend_entries_wrap_into_centred_rows() {
        assert_eq!(legend_layout(&[100, 100], 1000), [(385, 0), (515, 0)]);
        let widths = [300, 400, 300, 500];
        let places = legend_layout(&widths, 1000);
        assert_eq!(places.iter().map(|p| p.1).collect::<Vec<_>>(), [0, 0, 1, 1]);
        for row in 0..2 {
            let entries: Vec<(u32, u32)> = places
                .iter()
                .zip(widths)
                .filter(|(p, _)| p.1 == row)
                .map(|(p, w)| (p.0, p.0 + w))
                .collect();
            let (start, end) = (entries[0].0, entries[entries.len() - 1].1);
            assert!(end <= 1000 && start.abs_diff(1000 - end) <= 1, "{places:?}");
            assert_eq!(entries[1].0, entries[0].1 + LEGEND_GAP, "{places:?}");
        }
        // Wider than the figure: alone in its row, at its left edge.
        assert_eq!(legend_layout(&[1200, 10], 1000), [(0, 0), (495, 1)]);
    }

    #[test]
    fn axis_labels_are_short() {
        assert_eq!(compact(0.7000000000000001), "0.7");
        assert_eq!(compact(200.0), "200");
        assert_eq!(compact(0.0125), "0.0125");
        assert_eq!(compact(1.5), "1.5");
        assert_eq!(compact(18_000_000.0), "1.8e7");
        assert_eq!(compact(0.0001), "1e-4");
        assert_eq!(compact(115_000.0), "1.15e5");
        assert_eq!(compact(-0.000_012_5), "-1.25e-5");
    }
}
