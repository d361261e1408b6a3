"""Bytes in and out: storage (local paths and s3://, retries, atomic writes, the one sha256 helper),
the results files (schema, writer, the one reader) and a local S3 server for tests and the demo."""
