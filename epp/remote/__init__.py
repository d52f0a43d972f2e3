"""EPP's own gRPC contracts (proto/), compiled."""
