//! The loss curve as a PNG (plotters, bitmap backend, an embedded DejaVu Sans
//! font so no system fonts are needed).

use std::path::Path;

use plotters::prelude::*;

use crate::error::{Result, TrainError};

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// Plot training loss (and validation loss per domain, if any) against step.
pub fn loss_png(
    path: &Path,
    train: &[(u64, f64)],
    valid: &[(String, Vec<(u64, f64)>)],
) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| {
        TrainError::Other(format!(
            "{}: cannot draw the loss curve: {e}",
            path.display()
        ))
    };
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| err(&"font"))?;
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
