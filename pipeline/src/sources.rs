//! Sources other than Kafka: prepared batches, for tests, benchmarks and generated data.

use crate::batch::Batch;
use crate::error::PipelineError;
use crate::graph::{Source, SourceContext};
use crate::stages::Output;

/// Sends prepared batches in order, then ends (the pipeline then drains and finishes).
/// Batches not yet sent when shutdown is requested are dropped.
pub struct BatchSource<I> {
    batches: I,
}

impl<I> BatchSource<I> {
    /// A source of `batches`.
    pub fn new<T>(batches: impl IntoIterator<IntoIter = I>) -> Self
    where
        I: Iterator<Item = Batch<T>>,
    {
        Self {
            batches: batches.into_iter(),
        }
    }
}

impl<T, I> Source for BatchSource<I>
where
    T: Send + 'static,
    I: Iterator<Item = Batch<T>> + Send + 'static,
{
    type Item = T;

    async fn run(self, out: Output<T>, ctx: SourceContext) -> Result<(), PipelineError> {
        for batch in self.batches {
            if ctx.shutdown.is_triggered() {
                break;
            }
            out.send(batch).await?;
        }
        Ok(())
    }
}
