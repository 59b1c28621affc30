"""gRPC servicers: thin adapters between deml.v1 messages and the domain."""
