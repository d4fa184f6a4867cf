-- EFGS (EU Federation Gateway Service): the gateways we exchange keys with, what we uploaded to them (per window
-- and per upload batch), where each day's download chain stands, and each download's history.
--
-- Pulled keys are stored in `exposure` with local_provenance = false, sync_query_id = 'efgs:<target_id>' (a
-- federation query id can never contain ':') and sync_id = efgs_download.download_id. Push reads only keys with
-- local_provenance = true and no source at all, so keys from EFGS or any partner are never uploaded.

CREATE TABLE efgs_target (
    target_id           TEXT PRIMARY KEY CHECK (target_id ~ '^[A-Za-z0-9_.-]+$'),
    url                 TEXT NOT NULL CHECK (url ~ '^https://'),   -- base URL; /diagnosiskeys/... is appended
    country             TEXT NOT NULL CHECK (country ~ '^[A-Z]{2}$'), -- our country: origin of what we upload
    client_cert         TEXT NOT NULL,      -- PEM (public) of the TLS client certificate (chain)
    tls_credentials     TEXT NOT NULL,      -- key reference file:<name>: TLS private key + certificate, mode 0600
    signing_cert        TEXT NOT NULL,      -- PEM (public) of the batch signing certificate
    signing_credentials TEXT NOT NULL,      -- key reference file:<name> of the signing private key
    ca_cert             TEXT,               -- PEM bundle trusted for the gateway's TLS (default: system roots)
    created_at          TIMESTAMPTZ NOT NULL
);

-- One pushed window of key creation times. Windows of one target never share a key: a key whose created_at falls
-- in an earlier window of the target (smaller window_id) is left out of later ones.
CREATE TABLE efgs_push_window (
    window_id    BIGSERIAL PRIMARY KEY,
    target_id    TEXT NOT NULL REFERENCES efgs_target (target_id) ON DELETE CASCADE,
    window_start TIMESTAMPTZ NOT NULL,
    window_end   TIMESTAMPTZ NOT NULL,
    key_count    BIGINT NOT NULL,
    batches      INTEGER NOT NULL,
    planned_at   TIMESTAMPTZ NOT NULL,
    CHECK (window_start < window_end),
    UNIQUE (target_id, window_start, window_end)
);
CREATE INDEX efgs_push_window_target_end ON efgs_push_window (target_id, window_end DESC);

-- One upload batch (at most 5000 keys): its deterministic batchTag and the key range [key_from, key_to) of the
-- window's key-sorted list. The boundaries are key bytes: they are cleared once the batch is final.
CREATE TABLE efgs_upload_batch (
    window_id    BIGINT NOT NULL REFERENCES efgs_push_window (window_id) ON DELETE CASCADE,
    batch_num    INTEGER NOT NULL CHECK (batch_num >= 1),
    target_id    TEXT NOT NULL REFERENCES efgs_target (target_id) ON DELETE CASCADE,
    window_start TIMESTAMPTZ NOT NULL,
    window_end   TIMESTAMPTZ NOT NULL,
    batch_tag    TEXT NOT NULL,
    key_from     BYTEA,
    key_to       BYTEA,
    key_count    INTEGER NOT NULL,             -- keys planned
    keys_sent    INTEGER NOT NULL DEFAULT 0,   -- keys that passed EFGS's validation and were sent
    status       TEXT NOT NULL CHECK (status IN ('PLANNED', 'UPLOADED', 'SKIPPED', 'REJECTED', 'FAILED')),
    http_status  INTEGER,                      -- the gateway's last answer
    results      JSONB NOT NULL DEFAULT '{}',  -- per-key outcome counts: {"201": n, "409": n, "500": n, ...}
    error        TEXT,
    attempts     INTEGER NOT NULL DEFAULT 0,
    uploaded_at  TIMESTAMPTZ,
    updated_at   TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (window_id, batch_num),
    UNIQUE (target_id, batch_tag)
);
CREATE INDEX efgs_upload_batch_target ON efgs_upload_batch (target_id, window_start DESC, batch_num);

-- Where a day's batch chain stands: the last batch whose keys are stored, and the nextBatchTag it pointed to.
CREATE TABLE efgs_pull_cursor (
    target_id      TEXT NOT NULL REFERENCES efgs_target (target_id) ON DELETE CASCADE,
    day            DATE NOT NULL,
    last_batch_tag TEXT NOT NULL,
    next_batch_tag TEXT,                        -- NULL: the gateway said "null" (ask again for a later link)
    batches        INTEGER NOT NULL DEFAULT 0,
    updated_at     TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (target_id, day)
);

-- One pull of one day (exposure.sync_id of the keys it stored).
CREATE TABLE efgs_download (
    download_id       BIGSERIAL PRIMARY KEY,
    target_id         TEXT NOT NULL REFERENCES efgs_target (target_id) ON DELETE CASCADE,
    day               DATE NOT NULL,
    started           TIMESTAMPTZ NOT NULL,
    completed         TIMESTAMPTZ,
    batches           INTEGER NOT NULL DEFAULT 0,
    keys_received     BIGINT NOT NULL DEFAULT 0,
    insertions        BIGINT NOT NULL DEFAULT 0,
    revisions         BIGINT NOT NULL DEFAULT 0,
    skipped           BIGINT NOT NULL DEFAULT 0,   -- already stored (or a revocation of a key from elsewhere)
    rejected          BIGINT NOT NULL DEFAULT 0,   -- failed our publish rules
    own_origin        BIGINT NOT NULL DEFAULT 0,   -- our own country's keys (dropped)
    refused           BIGINT NOT NULL DEFAULT 0,   -- in a country's share whose signature did not verify
    refused_countries TEXT[] NOT NULL DEFAULT '{}',
    last_batch_tag    TEXT,
    error             TEXT
);
CREATE INDEX efgs_download_target ON efgs_download (target_id, started DESC);
