//! SVG charts of a bench report: each phase's records/s and CPU seconds per million records
//! (ceilings and worker phases side by side), and the live worker's record-age distribution
//! against the latency target.

use plotters::coord::Shift;
use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;

use super::Report;

/// Chart files: (file name, title, SVG text). The latency chart is there when the latency phase
/// ran and reported its quantiles.
pub(crate) fn render(report: &Report) -> Result<Vec<(&'static str, &'static str, String)>, String> {
    let mut charts = vec![(
        "bench-phases.svg",
        "records/s and CPU seconds per million records of each phase",
        phases(report)?,
    )];
    if let Some(svg) = latency(report)? {
        charts.push((
            "bench-latency.svg",
            "the live worker's record ages (slowest table) against the target",
            svg,
        ));
    }
    Ok(charts)
}

const CEILING: RGBColor = RGBColor(150, 150, 150);
const WORKER: RGBColor = RGBColor(31, 119, 180);
const TARGET: RGBColor = RGBColor(214, 39, 40);

fn phases(report: &Report) -> Result<String, String> {
    let names: Vec<String> = report.phases.iter().map(|p| p.name.clone()).collect();
    let colours: Vec<RGBColor> = report
        .phases
        .iter()
        .map(|p| {
            if p.name.starts_with("ceiling") {
                CEILING
            } else {
                WORKER
            }
        })
        .collect();
    let rates: Vec<f64> = report.phases.iter().map(|p| p.rate()).collect();
    let cpu: Vec<f64> = report.phases.iter().map(|p| p.cpu_per_million()).collect();
    let panel = 70 + 45 * names.len() as u32;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (960, 2 * panel)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let (top, bottom) = root.split_vertically(panel);
        bars(&top, "records/s", &names, &rates, &colours, 0)?;
        bars(
            &bottom,
            "CPU seconds per million records (user + system, the process's own)",
            &names,
            &cpu,
            &colours,
            2,
        )?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

/// Horizontal bars, the first value at the top, each labelled with its value.
fn bars<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    caption: &str,
    names: &[String],
    values: &[f64],
    colours: &[RGBColor],
    decimals: usize,
) -> Result<(), String> {
    let n = values.len() as u32;
    if n == 0 {
        return Ok(());
    }
    let max = values.iter().copied().fold(0.0, f64::max).max(1e-9) * 1.2;
    // Index 0 is drawn at the bottom: flip so the report's order reads top to bottom.
    let row = |i: usize| n - 1 - i as u32;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 17))
        .margin(12)
        .x_label_area_size(28)
        .y_label_area_size(250)
        .build_cartesian_2d(0.0..max, (0..n - 1).into_segmented())
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(names.len())
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(r) => n
                .checked_sub(1 + r)
                .and_then(|i| names.get(i as usize))
                .cloned()
                .unwrap_or_default(),
            _ => String::new(),
        })
        .x_label_formatter(&|v| format!("{v:.0}"))
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(values.iter().enumerate().map(|(i, v)| {
            let mut bar = Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(row(i))),
                    (*v, SegmentValue::Exact(row(i) + 1)),
                ],
                colours.get(i).copied().unwrap_or(WORKER).filled(),
            );
            bar.set_margin(6, 6, 0, 0);
            bar
        }))
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(values.iter().enumerate().map(|(i, v)| {
            Text::new(
                format!(" {v:.decimals$}"),
                (*v, SegmentValue::CenterOf(row(i))),
                ("sans-serif", 13),
            )
        }))
        .map_err(|e| e.to_string())?;
    Ok(())
}

fn latency(report: &Report) -> Result<Option<String>, String> {
    let Some(l) = &report.latency else {
        return Ok(None);
    };
    if l.quantiles.is_empty() {
        return Ok(None);
    }
    let target = (report.settings.batch_linger_ms + 500) as f64;
    let top = l.quantiles.iter().map(|(_, ms)| *ms).fold(target, f64::max) * 1.15;
    let n = l.quantiles.len() as u32;
    let labels: Vec<String> = l
        .quantiles
        .iter()
        .map(|(q, _)| quantile_label(*q))
        .collect();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (960, 460)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let caption = format!(
            "record age by quantile, table {} at {} records/s ({} source ranges)",
            l.sink, l.rate, l.samples
        );
        let mut chart = ChartBuilder::on(&root)
            .caption(caption, ("sans-serif", 17))
            .margin(12)
            .x_label_area_size(32)
            .y_label_area_size(60)
            .build_cartesian_2d((0..n - 1).into_segmented(), 0.0..top)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(labels.len())
            .x_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) => labels.get(*i as usize).cloned().unwrap_or_default(),
                _ => String::new(),
            })
            .y_desc("milliseconds")
            .y_label_formatter(&|v| format!("{v:.0}"))
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(|e| e.to_string())?;
        let point = |i: usize, ms: f64| (SegmentValue::CenterOf(i as u32), ms);
        chart
            .draw_series(LineSeries::new(
                l.quantiles
                    .iter()
                    .enumerate()
                    .map(|(i, (_, ms))| point(i, *ms)),
                WORKER.stroke_width(2),
            ))
            .map_err(|e| e.to_string())?
            .label("record age")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], WORKER.stroke_width(2)));
        chart
            .draw_series(l.quantiles.iter().enumerate().map(|(i, (_, ms))| {
                EmptyElement::at(point(i, *ms))
                    + Circle::new((0, 0), 4, WORKER.filled())
                    + Text::new(format!("{ms:.0}"), (6, -18), ("sans-serif", 12))
            }))
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(LineSeries::new(
                [
                    (SegmentValue::Exact(0), target),
                    (SegmentValue::Last, target),
                ],
                TARGET.stroke_width(1),
            ))
            .map_err(|e| e.to_string())?
            .label(format!("target: linger + 500 ms = {target:.0} ms"))
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], TARGET.stroke_width(1)));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK.mix(0.3))
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(Some(svg))
}

/// `0.99` → `p99`, `0.999` → `p99.9`, `0` → `min`, `1` → `max`.
fn quantile_label(q: f64) -> String {
    if q <= 0.0 {
        "min".into()
    } else if q >= 1.0 {
        "max".into()
    } else {
        let p = format!("{:.3}", q * 100.0);
        format!("p{}", p.trim_end_matches('0').trim_end_matches('.'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_named_as_people_say_them() {
        let names: Vec<String> = [0.0, 0.5, 0.9, 0.99, 0.999, 1.0]
            .into_iter()
            .map(quantile_label)
            .collect();
        assert_eq!(names, ["min", "p50", "p90", "p99", "p99.9", "max"]);
    }
}
