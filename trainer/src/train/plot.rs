//! The loss curve as a PNG (plotters, bitmap backend, an embedded DejaVu Sans
//! font so no system fonts are needed).

use std::path::Path;

use plotters::prelude::*;

use crate::error::{Result, TrainError};

static FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");

/// Plot training loss (and validation loss per domain, if any) against step.
/// The PNG is drawn under a temporary name and renamed into place.
pub fn loss_png(
    path: &Path,
    train: &[(u64, f64)],
    valid: &[(String, Vec<(u64, f64)>)],
) -> Result<()> {
    sigma_data::fsutil::replace_with(path, |tmp| draw_loss(tmp, train, valid))
}

fn draw_loss(path: &Path, train: &[(u64, f64)], valid: &[(String, Vec<(u64, f64)>)]) -> Result<()> {
    let err = start(path, "the loss curve")?;
    let all = train.iter().chain(valid.iter().flat_map(|(_, v)| v.iter()));
    let (mut lo, mut hi, mut max_step) = (f64::INFINITY, f64::NEG_INFINITY, 1u64);
    for &(s, l) in all {
        lo = lo.min(l);
        hi = hi.max(l);
        max_step = max_step.max(s);
    }
    if !lo.is_finite() {
        return Err(err(&"no points"));
    }
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("sigma: loss", ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(0u64..max_step, (lo - pad)..(hi + pad))
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss (nats/token)")
        .draw()
        .map_err(|e| err(&e))?;
    chart
        .draw_series(LineSeries::new(train.iter().copied(), &BLUE))
        .map_err(|e| err(&e))?
        .label("train")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLUE));
    let colors = [RED, GREEN, MAGENTA, CYAN, BLACK];
    for (i, (name, pts)) in valid.iter().enumerate() {
        let c = colors[i % colors.len()];
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(format!("valid {name}"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c));
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 4, c.filled())))
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// The error of drawing `what` into `path`, once the font is registered.
fn start<'a>(
    path: &'a Path,
    what: &'a str,
) -> Result<impl Fn(&dyn std::fmt::Display) -> TrainError + 'a> {
    let err = move |e: &dyn std::fmt::Display| {
        TrainError::file(path.display(), format!("cannot draw {what}: {e}"))
    };
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| err(&"font"))?;
    Ok(err)
}

type XyChart<'b, 'a> = ChartContext<
    'b,
    BitMapBackend<'a>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

/// A white 960 x 600 chart of `title` with f64 axes `x` and `y` and their
/// descriptions, its mesh drawn.
fn xy_chart<'b, 'a>(
    root: &'b DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>,
    title: &str,
    (x_desc, y_desc): (&str, &str),
    x: std::ops::Range<f64>,
    y: std::ops::Range<f64>,
    err: &dyn Fn(&dyn std::fmt::Display) -> TrainError,
) -> Result<XyChart<'b, 'a>> {
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x, y)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .draw()
        .map_err(|e| err(&e))?;
    Ok(chart)
}

/// One traced action: (rank, name, category, start µs, duration µs).
pub type TraceEvent = (usize, String, String, f64, f64);

/// A pipeline timeline: one row per rank, a box per action coloured by kind
/// (forward, backward, send/receive, optimizer), labelled with its
/// micro-batch, time in milliseconds across.
pub fn trace_png(path: &Path, events: &[TraceEvent], title: &str) -> Result<()> {
    sigma_data::fsutil::replace_with(path, |tmp| draw_trace(tmp, events, title))
}

fn draw_trace(path: &Path, events: &[TraceEvent], title: &str) -> Result<()> {
    let err = start(path, "the trace")?;
    if events.is_empty() {
        return Err(err(&"no events"));
    }
    let t0 = events.iter().map(|e| e.3).fold(f64::INFINITY, f64::min);
    let t1 = events.iter().map(|e| e.3 + e.4).fold(0.0, f64::max);
    let ranks = events.iter().map(|e| e.0).max().unwrap_or(0) + 1;
    let ms = |t: f64| (t - t0) / 1e3;
    let root = BitMapBackend::new(path, (1400, 120 + 70 * ranks as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(14)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..ms(t1), -0.5..(ranks as f64 - 0.5))
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("ms")
        .y_labels(ranks)
        .y_label_formatter(&|y| format!("rank {}", y.round() as i64))
        .disable_y_mesh()
        .draw()
        .map_err(|e| err(&e))?;
    let color = |cat: &str| match cat {
        "forward" => RGBColor(66, 133, 244),
        "backward" => RGBColor(52, 168, 83),
        "optimizer" => RGBColor(251, 140, 0),
        _ => RGBColor(190, 190, 190),
    };
    for (rank, name, cat, start, dur) in events {
        let y = *rank as f64;
        let (a, b) = (ms(*start), ms(start + dur));
        let h = if cat == "forward" || cat == "backward" {
            0.35
        } else {
            0.15
        };
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(a, y - h), (b, y + h)],
                color(cat).filled(),
            )))
            .map_err(|e| err(&e))?;
        if cat == "forward" || cat == "backward" {
            let label = name.split('.').next().unwrap_or(name).to_string();
            chart
                .draw_series(std::iter::once(Text::new(
                    label,
                    (a, y + 0.05),
                    ("sans-serif", 12).into_font().color(&WHITE),
                )))
                .map_err(|e| err(&e))?;
        }
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// Named curves, one colour each, with a legend: (name, points).
pub type Series = (String, Vec<(f64, f64)>);

const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Bounds of all points, padded 5 % (at least `min_pad`).
fn bounds<'a>(pts: impl Iterator<Item = &'a (f64, f64)>) -> Option<((f64, f64), (f64, f64))> {
    let (mut x0, mut x1, mut y0, mut y1) = (
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::INFINITY,
        f64::NEG_INFINITY,
    );
    for &(x, y) in pts.filter(|(x, y)| x.is_finite() && y.is_finite()) {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if !x0.is_finite() {
        return None;
    }
    let px = ((x1 - x0) * 0.05).max(1e-9 + x0.abs() * 0.05);
    let py = ((y1 - y0) * 0.05).max(1e-3);
    Some(((x0 - px, x1 + px), (y0 - py, y1 + py)))
}

/// Overlaid curves (e.g. the training loss of every ablation variant).
pub fn curves_png(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
) -> Result<()> {
    sigma_data::fsutil::replace_with(path, |tmp| draw_curves(tmp, title, x_desc, y_desc, series))
}

fn draw_curves(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
) -> Result<()> {
    let err = start(path, title)?;
    let ((x0, x1), (y0, y1)) =
        bounds(series.iter().flat_map(|s| s.1.iter())).ok_or_else(|| err(&"no points"))?;
    let root = BitMapBackend::new(path, (960, 600)).into_drawing_area();
    let mut chart = xy_chart(
        &root,
        title,
        (x_desc, y_desc),
        x0.max(0.0)..x1,
        y0..y1,
        &err,
    )?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// Labelled points (e.g. validation loss against KV-cache bytes per token).
pub fn scatter_png(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    points: &[(String, f64, f64)],
) -> Result<()> {
    sigma_data::fsutil::replace_with(path, |tmp| draw_scatter(tmp, title, x_desc, y_desc, points))
}

fn draw_scatter(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    points: &[(String, f64, f64)],
) -> Result<()> {
    let err = start(path, title)?;
    let xy: Vec<(f64, f64)> = points.iter().map(|p| (p.1, p.2)).collect();
    let ((x0, x1), (y0, y1)) = bounds(xy.iter()).ok_or_else(|| err(&"no points"))?;
    // Room on the right for the last point's label.
    let x1 = x1 + (x1 - x0) * 0.15;
    let root = BitMapBackend::new(path, (960, 600)).into_drawing_area();
    let mut chart = xy_chart(
        &root,
        title,
        (x_desc, y_desc),
        x0.max(0.0)..x1,
        y0..y1,
        &err,
    )?;
    for (i, (name, x, y)) in points.iter().enumerate() {
        let c = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(std::iter::once(Circle::new((*x, *y), 6, c.filled())))
            .map_err(|e| err(&e))?;
        chart
            .draw_series(std::iter::once(Text::new(
                name.clone(),
                (*x, *y),
                ("sans-serif", 14).into_font().color(&BLACK).pos(
                    plotters::style::text_anchor::Pos::new(
                        plotters::style::text_anchor::HPos::Left,
                        plotters::style::text_anchor::VPos::Bottom,
                    ),
                ),
            )))
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
