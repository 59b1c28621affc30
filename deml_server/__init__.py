"""DeML server: the requestor that runs federated jobs and serves inference."""
