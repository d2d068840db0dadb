-- Spans written in a batch together with other spans (other partitions', other windows'): a
-- replay cannot cut that batch again, so the worker writes the rows the table lacks instead of
-- relying on the batch's deduplication token. 0 for spans written alone.
ALTER TABLE sluice_batch_spans ADD COLUMN IF NOT EXISTS across Bool DEFAULT false;
