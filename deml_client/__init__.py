"""Thin Python client and `deml-client` CLI for a DeML server."""

from deml_client.client import DemlClient, DemlClientError

__all__ = ["DemlClient", "DemlClientError"]
