-- Padding keys are numbered from a sequence as they are created, and each batch records the highest
-- number that existed when it was planned. A shard then reads exactly the padding its plan counted, even
-- if another config pads an overlapping window between this batch's plan and its shard tasks.
CREATE SEQUENCE exposure_padding_seq;
ALTER TABLE exposure ADD COLUMN padding_seq BIGINT;
ALTER TABLE export_batch ADD COLUMN padding_seq_max BIGINT NOT NULL DEFAULT 0;
