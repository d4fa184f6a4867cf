-- Export pipeline: signing keys (signature infos), export configs, batches (one per config and window),
-- the shard plan of each batch, and the files written to blob storage.

CREATE TABLE signature_info (
    id                       BIGSERIAL PRIMARY KEY,
    name                     TEXT NOT NULL UNIQUE,
    signing_key              TEXT NOT NULL CHECK (signing_key <> ''),  -- key manager reference
    verification_key_id      TEXT NOT NULL DEFAULT '' CHECK (verification_key_id ~ '^[A-Za-z0-9_]*$'),
    verification_key_version TEXT NOT NULL DEFAULT '' CHECK (verification_key_version ~ '^[A-Za-z0-9_]*$'),
    signature_algorithm      TEXT NOT NULL DEFAULT '1.2.840.10045.4.3.2',
    from_timestamp           TIMESTAMPTZ NOT NULL,
    thru_timestamp           TIMESTAMPTZ,
    created_at               TIMESTAMPTZ NOT NULL,
    CHECK (thru_timestamp IS NULL OR thru_timestamp > from_timestamp)
);

CREATE TABLE export_config (
    config_id            BIGSERIAL PRIMARY KEY,
    name                 TEXT NOT NULL UNIQUE,
    bucket_name          TEXT NOT NULL,
    filename_root        TEXT NOT NULL CHECK (filename_root <> '' AND filename_root !~ '(^/|/$|\.\.)'),
    period_seconds       BIGINT NOT NULL CHECK (period_seconds > 0 AND 86400 % period_seconds = 0),
    output_region        TEXT NOT NULL CHECK (output_region <> ''),
    input_regions        TEXT[] NOT NULL DEFAULT '{}',
    include_travelers    BOOLEAN NOT NULL DEFAULT false,
    only_non_travelers   BOOLEAN NOT NULL DEFAULT false,
    exclude_regions      TEXT[] NOT NULL DEFAULT '{}',
    max_records_override BIGINT CHECK (max_records_override IS NULL OR max_records_override > 0),
    signature_info_ids   BIGINT[] NOT NULL DEFAULT '{}',
    from_timestamp       TIMESTAMPTZ NOT NULL,
    thru_timestamp       TIMESTAMPTZ,
    disabled             BOOLEAN NOT NULL DEFAULT false,
    CHECK (NOT (include_travelers AND only_non_travelers)),
    CHECK (thru_timestamp IS NULL OR thru_timestamp > from_timestamp)
);
CREATE UNIQUE INDEX export_config_root_bucket ON export_config (lower(filename_root), lower(bucket_name));

-- A batch keeps a snapshot of its config so re-runs and backfills export exactly what the first run did.
CREATE TABLE export_batch (
    batch_id           BIGSERIAL PRIMARY KEY,
    config_id          BIGINT NOT NULL REFERENCES export_config (config_id),
    start_timestamp    TIMESTAMPTZ NOT NULL,
    end_timestamp      TIMESTAMPTZ NOT NULL,
    status             TEXT NOT NULL DEFAULT 'OPEN'
                       CHECK (status IN ('OPEN', 'PENDING', 'COMPLETE', 'DEL_PEND', 'DELETED')),
    bucket_name        TEXT NOT NULL,
    filename_root      TEXT NOT NULL,
    output_region      TEXT NOT NULL,
    input_regions      TEXT[] NOT NULL,
    include_travelers  BOOLEAN NOT NULL,
    only_non_travelers BOOLEAN NOT NULL,
    exclude_regions    TEXT[] NOT NULL,
    max_records        BIGINT NOT NULL,
    key_count          BIGINT,
    revised_key_count  BIGINT,
    padding_key_count  BIGINT,
    file_count         INTEGER,
    stats              JSONB,
    created_at         TIMESTAMPTZ NOT NULL,
    completed_at       TIMESTAMPTZ,
    UNIQUE (config_id, start_timestamp, end_timestamp),
    CHECK (end_timestamp > start_timestamp)
);
CREATE INDEX export_batch_status ON export_batch (status);
CREATE INDEX export_batch_end ON export_batch (end_timestamp);

-- The shard plan of a batch: which slice of the key-sorted primary and revised lists each file holds.
-- Boundaries are stored here, not passed between tasks, so task messages never carry key material.
CREATE TABLE export_shard (
    batch_id     BIGINT NOT NULL REFERENCES export_batch (batch_id) ON DELETE CASCADE,
    shard_num    INTEGER NOT NULL CHECK (shard_num >= 1),
    primary_from BYTEA,   -- inclusive; NULL = from the first key
    primary_to   BYTEA,   -- exclusive; NULL = to the last key
    has_primary  BOOLEAN NOT NULL,
    revised_from BYTEA,
    revised_to   BYTEA,
    has_revised  BOOLEAN NOT NULL,
    PRIMARY KEY (batch_id, shard_num)
);

CREATE TABLE export_file (
    bucket_name       TEXT NOT NULL,
    filename          TEXT NOT NULL,
    batch_id          BIGINT NOT NULL REFERENCES export_batch (batch_id),
    batch_num         INTEGER NOT NULL,
    batch_size        INTEGER NOT NULL,
    key_count         BIGINT NOT NULL,
    revised_key_count BIGINT NOT NULL,
    bytes             BIGINT NOT NULL,
    sha256            TEXT NOT NULL,
    stats             JSONB NOT NULL DEFAULT '{}',
    status            TEXT NOT NULL DEFAULT 'COMPLETE' CHECK (status IN ('COMPLETE', 'DEL_PEND', 'DELETED')),
    created_at        TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (bucket_name, filename)
);
CREATE INDEX export_file_batch ON export_file (batch_id);

-- Padding keys are looked up per window; app_package_name marks them.
CREATE INDEX exposure_generated_idx ON exposure (created_at) WHERE app_package_name = 'export-generated';
