//! PNG line plots of [`Plot`]s with `plotters` (bitmap backend, text drawn with `ab_glyph` from a
//! TTF on this machine: no fontconfig, no system font lookup at run time beyond one file).

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Context, anyhow, bail};
use plotters::prelude::*;

use crate::report::size_label;
use crate::results::{Plot, num};

/// Series colours: distinct on white, sov's first.
const COLORS: [RGBColor; 6] = [
    RGBColor(214, 39, 40),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(90, 90, 90),
];

/// Fonts tried in order (`SOV_BENCH_FONT` first); Debian's `fonts-dejavu-core` has the first.
const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
];

fn ensure_font() -> anyhow::Result<()> {
    static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            let candidates = std::env::var("SOV_BENCH_FONT")
                .ok()
                .into_iter()
                .chain(FONTS.iter().map(|s| s.to_string()));
            for path in candidates {
                if let Ok(bytes) = std::fs::read(&path) {
                    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                    return plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                        .map_err(|_| format!("{path} is not a usable TTF font"));
                }
            }
            Err(format!(
                "no TTF font for the plots (tried {}; install fonts-dejavu-core or set \
                 SOV_BENCH_FONT)",
                FONTS.join(", ")
            ))
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

/// The axis value of a data value: log2 for a log x axis (sizes, depths and concurrency are
/// powers of two), log10 for a log y axis.
fn to_x(plot: &Plot, x: f64) -> f64 {
    if plot.log_x { x.max(1e-12).log2() } else { x }
}

fn to_y(plot: &Plot, y: f64) -> f64 {
    if plot.log_y { y.max(1e-12).log10() } else { y }
}

fn x_text(plot: &Plot, v: f64) -> String {
    let x = if plot.log_x { 2f64.powf(v.round()) } else { v };
    if plot.x_label.contains("size") && x >= 1.0 {
        size_label(x.round() as u64)
    } else {
        num(x)
    }
}

fn y_text(plot: &Plot, v: f64) -> String {
    num(if plot.log_y { 10f64.powf(v) } else { v })
}

/// A series' drawable points on the axes' scale, in x order: not finite, or not positive on a
/// log axis, is left out.
fn drawable(plot: &Plot, points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut out: Vec<(f64, f64)> = points
        .iter()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .filter(|(x, y)| (!plot.log_x || *x > 0.0) && (!plot.log_y || *y > 0.0))
        .map(|&(x, y)| (to_x(plot, x), to_y(plot, y)))
        .collect();
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// Draws `plot` into the PNG at `path`.
pub fn render(plot: &Plot, path: &Path) -> anyhow::Result<()> {
    ensure_font()?;
    let points: Vec<(f64, f64)> = plot
        .series
        .iter()
        .flat_map(|s| drawable(plot, &s.points))
        .collect();
    if points.is_empty() {
        bail!("plot {} has no points", plot.name);
    }
    let (mut x0, mut x1) = points
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    if x1 - x0 < 1e-9 {
        x0 -= 1.0;
        x1 += 1.0;
    }
    // A log axis gets a fixed margin so that plotters' round label points fall on whole
    // exponents; a linear one 4% of its span.
    let pad = if plot.log_x { 0.3 } else { (x1 - x0) * 0.04 };
    let (x0, x1) = (x0 - pad, x1 + pad);
    let ymax = points.iter().map(|p| p.1).fold(f64::MIN, f64::max);
    let ymin = points.iter().map(|p| p.1).fold(f64::MAX, f64::min);
    let (y0, y1) = if plot.log_y {
        (ymin.floor(), ymax.ceil().max(ymin.floor() + 1.0))
    } else {
        (0.0, (ymax * 1.12).max(1e-9))
    };
    draw(plot, path, (x0, x1), (y0, y1)).map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// Where x labels go: on a log axis the whole powers of two (no "1.41 clients"), at most about
/// ten of them; on a linear one the data's own x values.
fn x_ticks(plot: &Plot, x0: f64, x1: f64) -> Vec<f64> {
    if plot.log_x {
        let all: Vec<f64> = (x0.ceil() as i64..=x1.floor() as i64)
            .map(|e| e as f64)
            .collect();
        let step = all.len().div_ceil(10).max(1);
        all.into_iter().step_by(step).collect()
    } else {
        let mut xs: Vec<f64> = plot
            .series
            .iter()
            .flat_map(|s| drawable(plot, &s.points))
            .map(|p| p.0)
            .collect();
        xs.sort_by(f64::total_cmp);
        xs.dedup();
        xs
    }
}

fn draw(
    plot: &Plot,
    path: &Path,
    (x0, x1): (f64, f64),
    (y0, y1): (f64, f64),
) -> Result<(), Box<dyn std::error::Error>> {
    let root = BitMapBackend::new(path, (960, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(&plot.title, ("sans-serif", 26))
        .margin(18)
        .x_label_area_size(52)
        .y_label_area_size(84)
        .build_cartesian_2d(x0..x1, y0..y1)?;
    let ticks = x_ticks(plot, x0, x1);
    // plotters places labels at round numbers of the axis; only those at a tick get text.
    let xf = |v: &f64| {
        if ticks.iter().any(|t| (t - v).abs() < 1e-6) {
            x_text(plot, *v)
        } else {
            String::new()
        }
    };
    let yf = |v: &f64| y_text(plot, *v);
    chart
        .configure_mesh()
        .x_desc(plot.x_label.as_str())
        .x_labels(if plot.log_x {
            ((x1 - x0).floor() as usize + 1).min(10)
        } else {
            40
        })
        .x_max_light_lines(1)
        .y_max_light_lines(4)
        .y_desc(plot.y_label.as_str())
        .y_labels(8)
        .x_label_formatter(&xf)
        .y_label_formatter(&yf)
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 18))
        .draw()?;
    for (i, s) in plot.series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()].to_rgba();
        let pts = drawable(plot, &s.points);
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(3)))?
            .label(s.name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
            });
        chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 5, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Renders every plot of `plots` into `dir` as `<name>.png`; returns the file names.
pub fn render_all(plots: &[Plot], dir: &Path) -> anyhow::Result<Vec<String>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut names = Vec::new();
    for p in plots {
        let file = format!("{}.png", p.name);
        render(p, &dir.join(&file)).with_context(|| format!("plot {}", p.name))?;
        names.push(file);
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::Series;

    #[test]
    fn a_plot_becomes_a_png() {
        let dir = tempfile::tempdir().unwrap();
        let plot = Plot {
            name: "t".into(),
            title: "PUT throughput by object size".into(),
            x_label: "object size".into(),
            y_label: "MiB/s".into(),
            log_x: true,
            log_y: false,
            series: vec![
                Series {
                    name: "sov".into(),
                    points: vec![(4096.0, 10.0), (1048576.0, 200.0), (268435456.0, 300.0)],
                },
                Series {
                    name: "peer".into(),
                    points: vec![(4096.0, 20.0), (1048576.0, f64::NAN)],
                },
            ],
        };
        let files = render_all(&[plot], dir.path()).unwrap();
        let bytes = std::fs::read(dir.path().join(&files[0])).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        assert!(bytes.len() > 5000, "{} bytes", bytes.len());
        assert_eq!(
            x_text(
                &Plot {
                    log_x: true,
                    x_label: "object size".into(),
                    ..Default::default()
                },
                12.0
            ),
            "4KiB"
        );
        let empty = Plot {
            name: "e".into(),
            ..Default::default()
        };
        assert!(render(&empty, &dir.path().join("e.png")).is_err());
    }
}
