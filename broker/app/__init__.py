"""Use cases: issuance, responder, approval desk — behind ports for Vault, store, audit."""
