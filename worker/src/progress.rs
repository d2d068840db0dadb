//! `run --progress`: a progress bar on stderr. In drain mode it counts records done of those
//! to drain (to the end offsets the drain started with), with the rate and the time left;
//! otherwise items written and the rate. Where stderr is not a terminal (a log file, CI), a
//! line every ten seconds instead.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sluice_pipeline::{DrainProgress, PipelineHandle};
use tokio::task::JoinHandle;

/// The running display.
pub(crate) struct Reporter {
    task: JoinHandle<()>,
    bar: ProgressBar,
    drain: Option<DrainProgress>,
    handle: PipelineHandle,
    terminal: bool,
    started: Instant,
}

impl Reporter {
    /// Stops the display, showing where it ended (a last line where stderr is no terminal).
    pub(crate) async fn finish(self) {
        self.task.abort();
        let _ = self.task.await;
        let secs = self.started.elapsed().as_secs_f64();
        let line = match self.drain.as_ref().and_then(DrainProgress::get) {
            Some((done, total)) => {
                self.bar.set_length(total);
                self.bar.set_position(done);
                format!("drain: {done}/{total} records in {secs:.1} s")
            }
            None => format!(
                "run: {} items written in {secs:.1} s",
                self.handle.items_written()
            ),
        };
        self.bar.finish();
        if !self.terminal {
            eprintln!("{line}");
        }
    }
}

/// Starts the display; `drain`: the drain's progress, in drain mode.
pub(crate) fn spawn(handle: PipelineHandle, drain: Option<DrainProgress>) -> Reporter {
    let terminal = std::io::stderr().is_terminal();
    let bar = match &drain {
        Some(_) => ProgressBar::new(0).with_style(
            ProgressStyle::with_template(
                "drain {wide_bar} {human_pos}/{human_len} records  {per_sec}  ETA {eta}",
            )
            .expect("valid template"),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {human_pos} items written  {per_sec}")
                .expect("valid template"),
        ),
    };
    bar.set_draw_target(if terminal {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let shown = bar.clone();
    let source = drain.clone();
    let started = Instant::now();
    let items = handle.clone();
    let task = tokio::spawn(async move {
        let mut last_line = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let (done, total) = match &source {
                Some(d) => match d.get() {
                    Some(p) => (p.0, Some(p.1)),
                    None => continue,
                },
                None => (items.items_written(), None),
            };
            if let Some(total) = total {
                shown.set_length(total);
            }
            shown.set_position(done);
            shown.tick();
            if !terminal && last_line.elapsed() >= Duration::from_secs(10) {
                last_line = Instant::now();
                let secs = started.elapsed().as_secs_f64().max(1e-9);
                let rate = done as f64 / secs;
                match total {
                    // Nothing done yet: the group is forming (half the session timeout on
                    // some brokers) or the first batches are on their way.
                    Some(total) if done == 0 => {
                        eprintln!("drain: 0/{total} records, starting (joining the group)")
                    }
                    Some(total) => {
                        let left = total.saturating_sub(done) as f64 / rate.max(1e-9);
                        eprintln!(
                            "drain: {done}/{total} records, {rate:.0} records/s, about {left:.0} s left"
                        );
                    }
                    None => eprintln!("run: {done} items written, {rate:.0} items/s"),
                }
            }
        }
    });
    Reporter {
        task,
        bar,
        drain,
        handle,
        terminal,
        started,
    }
}
