"""Pipeline stages: each is a typed config plus a callable class run by Ray Data."""
