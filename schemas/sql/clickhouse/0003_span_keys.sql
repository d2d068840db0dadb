-- Window spans: a partition's records are cut per window (the window start in span_key), so
-- each recorded span names its window; 0 for plain span batches.
ALTER TABLE sluice_batch_spans ADD COLUMN IF NOT EXISTS span_key Int64 DEFAULT 0;
