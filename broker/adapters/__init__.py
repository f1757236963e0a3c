"""Adapters: Vault, the credential store (SQLite, PostgreSQL), the audit log, OIDC, federation."""
