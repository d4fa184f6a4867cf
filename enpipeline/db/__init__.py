"""Every SQL statement enpipeline runs lives in this package (schema changes live in ``sql/``)."""
