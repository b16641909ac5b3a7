"""The worker API protobufs and their generated stubs."""
