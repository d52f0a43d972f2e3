"""Routing state shared by EPP replicas and worker processes through Valkey/Redis (see ``store``)."""
