"""The wire contract shared by broker and sidecar: metadata keys, bounds, mTLS."""
