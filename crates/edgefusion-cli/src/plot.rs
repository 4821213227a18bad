//! PNG charts (plotters, bitmap backend). Labels need a TrueType font: `$EDGEFUSION_FONT`,
//! else the first of the usual system fonts that exists.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};
use edgefusion_model::LayerType;
use edgefusion_train::analysis::RouterAnalysis;
use plotters::prelude::*;
use plotters::style::FontStyle;

/// Where the usual sans-serif TrueType fonts live on Linux, macOS and Windows.
const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "/Library/Fonts/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

const FAMILY: &str = "sans-serif";
const SSM_COLOR: RGBColor = RGBColor(230, 120, 30);
const ATTENTION_COLOR: RGBColor = RGBColor(40, 100, 200);

/// Refuses an output path that is not a `.png` file in an existing folder, before any
/// long work.
pub fn check_png_path(path: &Path) -> Result<()> {
    let is_png = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));
    if !is_png {
        bail!("{}: the chart is a PNG; name a .png file", path.display());
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            bail!(
                "{}: folder {} does not exist",
                path.display(),
                dir.display()
            );
        }
    }
    Ok(())
}

/// Finds a TrueType font and registers it for the charts' labels (once per process).
fn register_font() -> Result<()> {
    static REGISTERED: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let found = REGISTERED.get_or_init(|| {
        let from_env = std::env::var_os("EDGEFUSION_FONT").map(PathBuf::from);
        let path = match &from_env {
            Some(p) => p.clone(),
            None => FONT_CANDIDATES
                .iter()
                .map(PathBuf::from)
                .find(|p| p.is_file())
                .ok_or_else(|| {
                    "no TrueType font found for the chart's labels: install one (Debian: \
                     fonts-dejavu-core) or set EDGEFUSION_FONT=/path/to/font.ttf"
                        .to_string()
                })?,
        };
        let bytes =
            std::fs::read(&path).map_err(|e| format!("EDGEFUSION_FONT {}: {e}", path.display()))?;
        // plotters keeps fonts for the whole process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font(FAMILY, FontStyle::Normal, bytes)
            .map_err(|_| format!("{}: not a TrueType/OpenType font", path.display()))?;
        Ok(path)
    });
    found.as_ref().map(|_| ()).map_err(|e| anyhow!("{e}"))
}

/// Renders into `path` through a temporary file and a rename, so that a failed chart
/// leaves no half-written PNG.
fn write_png(
    path: &Path,
    size: (u32, u32),
    draw: impl FnOnce(&DrawingArea<BitMapBackend, plotters::coord::Shift>) -> Result<()>,
) -> Result<()> {
    register_font()?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .context("the chart's path has no file name")?;
    let tmp = path.with_file_name(format!(".{name}.partial.png"));
    let result = (|| -> Result<()> {
        let root = BitMapBackend::new(&tmp, size).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
        draw(&root)?;
        root.present().map_err(|e| anyhow!("{e}"))?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.context(format!("drawing {}", path.display())));
    }
    edgefusion_io::durable::commit_rename(&tmp, path)
        .with_context(|| format!("writing {}", path.display()))
}

fn plot_error<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("{e}")
}

/// One line of a chart: its label, colour and (x, y) points.
type Curve<'a> = (&'a str, RGBColor, Vec<(f64, f64)>);

/// A line chart of `series` against the router step.
fn curves(
    area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    title: &str,
    y_desc: &str,
    series: &[Curve<'_>],
    y_range: Option<(f64, f64)>,
) -> Result<()> {
    let points = || series.iter().flat_map(|(_, _, p)| p.iter());
    let x_max = points().map(|p| p.0).fold(1.0, f64::max);
    let (y_lo, y_hi) = y_range.unwrap_or_else(|| {
        let hi = points().map(|p| p.1).fold(f64::MIN, f64::max);
        let lo = points().map(|p| p.1).fold(f64::MAX, f64::min).min(0.0);
        let hi = if hi.is_finite() && hi > lo {
            hi
        } else {
            lo + 1.0
        };
        (lo, hi + 0.05 * (hi - lo))
    });
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FAMILY, 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..x_max, y_lo..y_hi)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("router step")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc(y_desc)
        .label_style((FAMILY, 15))
        .draw()
        .map_err(plot_error)?;
    for (label, color, pts) in series {
        let color = *color;
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(plot_error)?
            .label(*label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .label_font((FAMILY, 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(plot_error)?;
    Ok(())
}

/// The router chart: gates per layer coloured by the branch kept, then ssm_frac and mean
/// gate, mean gate entropy, and λ over training.
pub fn router_chart(a: &RouterAnalysis, path: &Path) -> Result<()> {
    write_png(path, (1400, 1000), |root| {
        let panels = root.split_evenly((2, 2));
        let n = a.layers.len();
        let mut chart = ChartBuilder::on(&panels[0])
            .caption(
                format!(
                    "Gate per layer at step {} (ssm_frac {:.2})",
                    a.step,
                    a.ssm_frac()
                ),
                (FAMILY, 22),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), -0.1f64..1.05)
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_desc("layer")
            .y_desc("gate g (SSM share); strip: route kept")
            .x_labels(n.min(16))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .label_style((FAMILY, 15))
            .draw()
            .map_err(plot_error)?;
        for (route, color) in [
            (LayerType::Ssm, SSM_COLOR),
            (LayerType::Attention, ATTENTION_COLOR),
        ] {
            chart
                .draw_series(a.layers.iter().filter(|l| l.route == route).flat_map(|l| {
                    let x = l.layer as f64;
                    // The gate as a bar, and below the axis a strip that shows the route
                    // even where the gate is 0.
                    [
                        Rectangle::new([(x - 0.4, 0.0), (x + 0.4, l.gate)], color.filled()),
                        Rectangle::new([(x - 0.45, -0.08), (x + 0.45, -0.03)], color.filled()),
                    ]
                }))
                .map_err(plot_error)?
                .label(format!("keeps {}", route.name()))
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled())
                });
        }
        chart
            .draw_series(LineSeries::new(
                [(-0.5, 0.5), (n as f64 - 0.5, 0.5)],
                BLACK.mix(0.4).stroke_width(1),
            ))
            .map_err(plot_error)?;
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font((FAMILY, 15))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(plot_error)?;

        let h = &a.history;
        let of = |f: &dyn Fn(&edgefusion_train::router::RouterStep) -> f64| -> Vec<(f64, f64)> {
            h.iter().map(|s| (s.step as f64, f(s))).collect()
        };
        let mut share = vec![
            ("ssm_frac (g > ½)", SSM_COLOR, of(&|s| s.ssm_frac)),
            ("mean gate", ATTENTION_COLOR, of(&|s| s.mean_gate)),
        ];
        if let (Some(t), Some(last)) = (a.target_ssm_fraction, h.last()) {
            share.push(("target", BLACK, vec![(0.0, t), (last.step as f64, t)]));
        }
        curves(
            &panels[1],
            "SSM share over training",
            "share of layers",
            &share,
            Some((0.0, 1.05)),
        )?;
        curves(
            &panels[2],
            "Mean gate entropy over training",
            "bits",
            &[(
                "entropy",
                RGBColor(120, 60, 160),
                of(&|s| s.gate_entropy_bits),
            )],
            Some((0.0, 1.05)),
        )?;
        curves(
            &panels[3],
            "Sparsity multiplier λ over training",
            "λ (nats/token/layer)",
            &[("λ", RGBColor(30, 140, 80), of(&|s| s.lambda))],
            None,
        )?;
        Ok(())
    })
}

const VARIANT_COLORS: [RGBColor; 4] = [
    RGBColor(90, 90, 90),
    ATTENTION_COLOR,
    RGBColor(30, 140, 80),
    SSM_COLOR,
];

/// Draws each (name, x, y) as a labelled dot.
fn draw_points<Y>(
    chart: &mut ChartContext<BitMapBackend, Cartesian2d<plotters::coord::types::RangedCoordf64, Y>>,
    points: &[(String, f64, f64)],
) -> Result<()>
where
    Y: plotters::coord::ranged1d::Ranged<ValueType = f64>,
{
    for (i, (name, x, y)) in points.iter().enumerate() {
        let color = VARIANT_COLORS[i % VARIANT_COLORS.len()];
        // The dot at the point, its name 10 px to the right of it (not over it).
        let dot = EmptyElement::at((*x, *y))
            + Circle::new((0, 0), 7, color.filled())
            + Text::new(
                name.clone(),
                (10, -8),
                (FAMILY, 17).into_font().color(&color),
            );
        chart
            .draw_series(std::iter::once(dot))
            .map_err(plot_error)?;
    }
    Ok(())
}

/// One labelled point per variant.
fn variant_points(
    area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    title: &str,
    y_desc: &str,
    points: &[(String, f64, f64)],
    log_y: bool,
) -> Result<()> {
    let x_max = points.iter().map(|p| p.1).fold(0.0, f64::max) * 1.15 + 1e-3;
    let y_hi = points.iter().map(|p| p.2).fold(f64::MIN, f64::max);
    let y_lo = points.iter().map(|p| p.2).fold(f64::MAX, f64::min);
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(title, (FAMILY, 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60);
    if log_y {
        // Whole decades, so the ticks fall on 1-2-5 values and every point has a label
        // below and above it.
        let lo = 10f64.powf((y_lo.max(1e-9) / 1.2).log10().floor());
        let hi = 10f64.powf((y_hi.max(1e-9) * 1.2).log10().ceil());
        let mut chart = builder
            .build_cartesian_2d(0f64..x_max, (lo..hi).log_scale())
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .x_desc("peak memory (GB)")
            .y_desc(y_desc)
            .y_label_formatter(&|v| format!("{v}"))
            .label_style((FAMILY, 15))
            .draw()
            .map_err(plot_error)?;
        draw_points(&mut chart, points)
    } else {
        let pad = 0.1 * (y_hi - y_lo).max(0.01);
        let mut chart = builder
            .build_cartesian_2d(0f64..x_max, (y_lo - pad)..(y_hi + 2.0 * pad))
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .x_desc("peak memory (GB)")
            .y_desc(y_desc)
            .label_style((FAMILY, 15))
            .draw()
            .map_err(plot_error)?;
        draw_points(&mut chart, points)
    }
}

/// The comparison chart: perplexity and mean task accuracy against peak memory, one point
/// per variant.
pub fn compare_chart(report: &edgefusion_eval::compare::CompareReport, path: &Path) -> Result<()> {
    let gb = |v: &edgefusion_eval::compare::VariantResult| {
        v.peak_rss_bytes.unwrap_or(v.file_bytes) as f64 / 1e9
    };
    let ppl: Vec<(String, f64, f64)> = report
        .variants
        .iter()
        .filter_map(|v| Some((v.name.clone(), gb(v), v.eval.perplexity.first()?.1.ppl)))
        .collect();
    let accuracy: Vec<(String, f64, f64)> = report
        .variants
        .iter()
        .filter_map(|v| {
            let scores: Vec<f64> = v
                .eval
                .tasks
                .iter()
                .filter_map(|t| t.metrics.first().map(|m| 100.0 * m.value.mean))
                .collect();
            (!scores.is_empty()).then(|| {
                (
                    v.name.clone(),
                    gb(v),
                    scores.iter().sum::<f64>() / scores.len() as f64,
                )
            })
        })
        .collect();
    write_png(path, (1400, 600), |root| {
        let panels = root.split_evenly((1, 2));
        if !ppl.is_empty() {
            variant_points(
                &panels[0],
                "Perplexity against memory",
                "PPL (log scale)",
                &ppl,
                true,
            )?;
        }
        if !accuracy.is_empty() {
            variant_points(
                &panels[1],
                "Mean task score against memory",
                "mean of the tasks' first metric (%)",
                &accuracy,
                false,
            )?;
        }
        Ok(())
    })
}

/// Colours of a line chart's series, in order (then repeated).
const SERIES_COLORS: [RGBColor; 6] = [
    RGBColor(40, 100, 200),
    RGBColor(230, 120, 30),
    RGBColor(40, 160, 80),
    RGBColor(200, 50, 60),
    RGBColor(130, 80, 180),
    RGBColor(120, 120, 120),
];

/// A line chart of labelled points, one line per series; with `log_y` the y axis is
/// logarithmic (every y must be positive).
pub fn line_chart(
    series: &[crate::chart::Series],
    title: &str,
    x_desc: &str,
    y_desc: &str,
    log_y: bool,
    path: &Path,
) -> Result<()> {
    // Plotted y: log10(y) on a log axis, labelled with y itself.
    let ty = |y: f64| if log_y { y.log10() } else { y };
    let points = || series.iter().flat_map(|(_, p)| p.iter());
    let (x_lo, x_hi) = points().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (y_lo, y_hi) = points().fold((f64::MAX, f64::MIN), |(a, b), p| {
        (a.min(ty(p.1)), b.max(ty(p.1)))
    });
    let pad = |lo: f64, hi: f64| {
        let span = if hi > lo { hi - lo } else { 1.0 };
        (lo - 0.06 * span, hi + 0.08 * span)
    };
    let ((x_lo, x_hi), (y_lo, y_hi)) = (pad(x_lo, x_hi), pad(y_lo, y_hi));
    write_png(path, (1200, 800), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, (FAMILY, 24))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(70)
            .build_cartesian_2d(x_lo..x_hi, y_lo..y_hi)
            .map_err(plot_error)?;
        let y_format = |v: &f64| {
            let y = if log_y { 10f64.powf(*v) } else { *v };
            if y.abs() >= 10.0 {
                format!("{y:.0}")
            } else {
                format!("{y:.2}")
            }
        };
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .x_label_formatter(&|x| format!("{x:.1}"))
            .y_label_formatter(&y_format)
            .label_style((FAMILY, 16))
            .draw()
            .map_err(plot_error)?;
        for (i, (name, pts)) in series.iter().enumerate() {
            let color = SERIES_COLORS[i % SERIES_COLORS.len()];
            let xy: Vec<(f64, f64)> = pts.iter().map(|p| (p.0, ty(p.1))).collect();
            chart
                .draw_series(LineSeries::new(xy.iter().copied(), color.stroke_width(2)))
                .map_err(plot_error)?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            // Each point: a dot, its label just above and to the right.
            chart
                .draw_series(pts.iter().zip(&xy).map(|(p, &at)| {
                    EmptyElement::at(at)
                        + Circle::new((0, 0), 4, color.filled())
                        + Text::new(
                            p.2.clone(),
                            (6, -16),
                            (FAMILY, 14).into_font().color(&color),
                        )
                }))
                .map_err(plot_error)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font((FAMILY, 16))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(plot_error)?;
        Ok(())
    })
}
