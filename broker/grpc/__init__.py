"""gRPC boundary: authentication, the error boundary, the services, the server."""
