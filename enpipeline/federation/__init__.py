"""Federation with partner key servers: the Fetch server, the puller, and the export-file importer."""
