-- Federation: partners we pull from (queries and their sync history), partners allowed to pull from us, and
-- partners whose published export files we import. `partner` names one neighbouring server on every side,
-- so keys that came from a partner are never served back to it.

CREATE TABLE federation_in_query (
    query_id               TEXT PRIMARY KEY CHECK (query_id ~ '^[A-Za-z0-9_.-]+$'),
    partner                TEXT NOT NULL CHECK (partner <> ''),
    server_addr            TEXT NOT NULL CHECK (server_addr <> ''),
    audience               TEXT NOT NULL CHECK (audience <> ''),
    include_regions        TEXT[] NOT NULL DEFAULT '{}',
    exclude_regions        TEXT[] NOT NULL DEFAULT '{}',
    only_local_provenance  BOOLEAN NOT NULL DEFAULT false,
    only_travelers         BOOLEAN NOT NULL DEFAULT false,
    credentials            TEXT NOT NULL,      -- key manager reference of the ES256 key that signs our bearer JWT
    issuer                 TEXT NOT NULL,
    subject                TEXT NOT NULL,
    tls                    BOOLEAN NOT NULL DEFAULT false,
    ca_file                TEXT,               -- PEM bundle to trust instead of the system roots (TLS only)
    last_timestamp         TIMESTAMPTZ,        -- the partner's cursors, saved with the keys they cover
    primary_cursor         TEXT,
    last_revised_timestamp TIMESTAMPTZ,
    revised_cursor         TEXT,
    created_at             TIMESTAMPTZ NOT NULL,
    CHECK (NOT (include_regions && exclude_regions))
);

CREATE TABLE federation_in_sync (
    sync_id               BIGSERIAL PRIMARY KEY,
    query_id              TEXT NOT NULL REFERENCES federation_in_query (query_id) ON DELETE CASCADE,
    started               TIMESTAMPTZ NOT NULL,
    completed             TIMESTAMPTZ,
    pages                 INTEGER NOT NULL DEFAULT 0,
    insertions            BIGINT NOT NULL DEFAULT 0,
    revisions             BIGINT NOT NULL DEFAULT 0,
    rejected              BIGINT NOT NULL DEFAULT 0,   -- failed validation (counted, never stored)
    skipped               BIGINT NOT NULL DEFAULT 0,   -- already known, or revisions of keys from elsewhere
    max_timestamp         TIMESTAMPTZ,
    max_revised_timestamp TIMESTAMPTZ,
    error                 TEXT
);
CREATE INDEX federation_in_sync_query ON federation_in_sync (query_id, started DESC);

CREATE TABLE federation_out_authorization (
    issuer          TEXT NOT NULL CHECK (issuer <> ''),
    subject         TEXT NOT NULL CHECK (subject <> ''),
    audience        TEXT,                       -- when set, the token's aud must equal it
    partner         TEXT NOT NULL CHECK (partner <> ''),
    public_key      TEXT NOT NULL,              -- PEM, ES256 (P-256)
    include_regions TEXT[] NOT NULL DEFAULT '{}',
    exclude_regions TEXT[] NOT NULL DEFAULT '{}',
    note            TEXT,
    created_at      TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (issuer, subject),
    CHECK (NOT (include_regions && exclude_regions))
);

-- A partner that publishes only export files (index.txt + signed zips).
CREATE TABLE export_importer (
    id              BIGSERIAL PRIMARY KEY,      -- exposure.export_import_id
    name            TEXT NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9_.-]+$'),
    partner         TEXT NOT NULL CHECK (partner <> ''),
    index_url       TEXT NOT NULL,              -- http(s)://, file:// or gs:// URL of the partner's index.txt
    export_root     TEXT,                       -- URL the index's entries are relative to (default: derived)
    regions         TEXT[] NOT NULL DEFAULT '{}', -- stored on imported keys; empty = the file's region
    traveler        BOOLEAN NOT NULL DEFAULT false,
    disabled        BOOLEAN NOT NULL DEFAULT false,
    created_at      TIMESTAMPTZ NOT NULL
);

CREATE TABLE export_importer_key (
    importer_id    BIGINT NOT NULL REFERENCES export_importer (id) ON DELETE CASCADE,
    key_id         TEXT NOT NULL,               -- verification_key_id in the files' SignatureInfo
    key_version    TEXT NOT NULL,
    public_key     TEXT NOT NULL,               -- PEM
    from_timestamp TIMESTAMPTZ,
    thru_timestamp TIMESTAMPTZ,
    PRIMARY KEY (importer_id, key_id, key_version)
);

CREATE TABLE import_file (
    import_file_id BIGSERIAL PRIMARY KEY,       -- exposure.import_file_id / revised_import_file_id
    importer_id    BIGINT NOT NULL REFERENCES export_importer (id) ON DELETE CASCADE,
    filename       TEXT NOT NULL,
    status         TEXT NOT NULL CHECK (status IN ('COMPLETE', 'FAILED')),
    processed_at   TIMESTAMPTZ NOT NULL,
    sha256         TEXT,
    keys_inserted  BIGINT NOT NULL DEFAULT 0,
    keys_revised   BIGINT NOT NULL DEFAULT 0,
    keys_rejected  BIGINT NOT NULL DEFAULT 0,
    keys_skipped   BIGINT NOT NULL DEFAULT 0,
    error          TEXT,
    UNIQUE (importer_id, filename)
);

-- Federation serves keys in (created_at, exposure_key) and (revised_at, exposure_key) order with keyset cursors:
-- many keys share one created_at (it is truncated to the hour), so the key breaks ties without a sort.
CREATE INDEX exposure_created_at_key_idx ON exposure (created_at, exposure_key);
DROP INDEX exposure_created_at_idx;
CREATE INDEX exposure_revised_at_key_idx ON exposure (revised_at, exposure_key) WHERE revised_at IS NOT NULL;
DROP INDEX exposure_revised_at_idx;
CREATE INDEX exposure_export_import_id_idx ON exposure (export_import_id) WHERE export_import_id IS NOT NULL;
