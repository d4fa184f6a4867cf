-- Retention: when a batch's files were swept (the reference never marked batches deleted).
ALTER TABLE export_batch ADD COLUMN deleted_at TIMESTAMPTZ;
CREATE INDEX export_batch_start ON export_batch (start_timestamp) WHERE status IN ('OPEN', 'PENDING', 'COMPLETE');
