"""Test and demo helpers: a local S3 server, synthetic shards, tiny models. Not used by production runs."""
