"""The operator's whole-store jobs: backup and restore, moving to PostgreSQL, rotating the secret."""
