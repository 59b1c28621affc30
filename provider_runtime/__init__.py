"""What runs on a worker or inside a Golem VM: task bundle in, result bundle out (docs/bundle.md).

Importing the package loads nothing heavy: the server imports `provider_runtime.partition` (numpy only)
without pulling in torch.
"""
