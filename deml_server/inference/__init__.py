"""Sharded batch inference: signature checks, the onnxruntime worker pool and the gateway both gRPC faces share."""

# Clients such as tritonclient send and accept messages up to INT32_MAX; the server's limits must match.
MAX_MESSAGE_BYTES = 2**31 - 1
