"""Generated from proto/epp/remote/v1/*.proto by `make proto` (grpcio-tools); do not edit."""
