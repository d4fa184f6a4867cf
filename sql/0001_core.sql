-- Core publish schema: health authorities and their keys, authorized apps, revision keys, and the
-- exposure table, range-partitioned by day on created_at so retention drops whole days.

CREATE TABLE health_authority (
    id            BIGSERIAL PRIMARY KEY,
    iss           TEXT NOT NULL UNIQUE,
    aud           TEXT NOT NULL,
    name          TEXT NOT NULL,
    jwks_uri      TEXT,
    enable_stats  BOOLEAN NOT NULL DEFAULT true
);

CREATE TABLE health_authority_key (
    health_authority_id BIGINT NOT NULL REFERENCES health_authority (id) ON DELETE CASCADE,
    version             TEXT NOT NULL,
    from_timestamp      TIMESTAMPTZ NOT NULL,
    thru_timestamp      TIMESTAMPTZ,
    public_key          TEXT NOT NULL,
    PRIMARY KEY (health_authority_id, version),
    CHECK (thru_timestamp IS NULL OR thru_timestamp > from_timestamp)
);

CREATE TABLE authorized_app (
    app_package_name                     TEXT PRIMARY KEY CHECK (app_package_name = lower(app_package_name) AND app_package_name <> ''),
    allowed_regions                      TEXT[] NOT NULL DEFAULT '{}',
    allowed_health_authority_ids         BIGINT[] NOT NULL DEFAULT '{}',
    bypass_health_authority_verification BOOLEAN NOT NULL DEFAULT false,
    bypass_revision_token                BOOLEAN NOT NULL DEFAULT false
);

-- Data keys that encrypt revision tokens, each wrapped by the configured key-encryption key.
CREATE TABLE revision_key (
    kid            BIGSERIAL PRIMARY KEY,
    aad            BYTEA,
    wrapped_cipher BYTEA,
    created_at     TIMESTAMPTZ NOT NULL,
    allowed        BOOLEAN NOT NULL DEFAULT true
);
CREATE INDEX revision_key_allowed_created_at ON revision_key (allowed, created_at);

-- exposure_key is not a primary key: a unique index on a partitioned table must contain the
-- partition column. Global uniqueness is kept by the writer (advisory lock per key, then a lookup
-- through exposure_key_idx) -- see enpipeline/db/exposures.py.
CREATE TABLE exposure (
    exposure_key                     BYTEA NOT NULL CHECK (length(exposure_key) = 16),
    transmission_risk                BIGINT NOT NULL,
    app_package_name                 TEXT,
    regions                          TEXT[] NOT NULL DEFAULT '{}',
    traveler                         BOOLEAN NOT NULL DEFAULT false,
    interval_number                  BIGINT NOT NULL,
    interval_count                   BIGINT NOT NULL,
    created_at                       TIMESTAMPTZ NOT NULL,
    local_provenance                 BOOLEAN NOT NULL DEFAULT true,
    sync_id                          BIGINT,
    sync_query_id                    TEXT,
    health_authority_id              BIGINT,
    report_type                      TEXT NOT NULL DEFAULT '',
    days_since_symptom_onset         BIGINT,
    revised_report_type              TEXT,
    revised_at                       TIMESTAMPTZ,
    revised_days_since_symptom_onset BIGINT,
    revised_transmission_risk        BIGINT,
    export_import_id                 BIGINT,
    import_file_id                   BIGINT,
    revised_import_file_id           BIGINT,
    vaccine_status                   BOOLEAN NOT NULL DEFAULT false
) PARTITION BY RANGE (created_at);

CREATE INDEX exposure_key_idx ON exposure (exposure_key);
CREATE INDEX exposure_created_at_idx ON exposure (created_at);
CREATE INDEX exposure_revised_at_idx ON exposure (revised_at) WHERE revised_at IS NOT NULL;
CREATE INDEX exposure_sync_query_id_idx ON exposure (sync_query_id) WHERE sync_query_id IS NOT NULL;

-- Creates the missing daily partitions exposure_pYYYYMMDD covering [from_day, to_day] (UTC days).
-- Serialised by an advisory lock so concurrent callers (migrate, cleanup, a publish that met a
-- missing day) do not race on CREATE TABLE. Returns how many partitions it created.
CREATE FUNCTION enp_ensure_exposure_partitions(from_day DATE, to_day DATE) RETURNS INTEGER
LANGUAGE plpgsql AS $$
DECLARE
    d       DATE;
    name    TEXT;
    created INTEGER := 0;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('enp_exposure_partitions'));
    d := from_day;
    WHILE d <= to_day LOOP
        name := 'exposure_p' || to_char(d, 'YYYYMMDD');
        IF to_regclass(name) IS NULL THEN
            EXECUTE format(
                'CREATE TABLE %I PARTITION OF exposure FOR VALUES FROM (%L) TO (%L)',
                name,
                (d::timestamp AT TIME ZONE 'UTC'),
                ((d + 1)::timestamp AT TIME ZONE 'UTC'));
            created := created + 1;
        END IF;
        d := d + 1;
    END LOOP;
    RETURN created;
END;
$$;
