"""Generated gRPC contract of DeML (package deml.v1). Regenerate with scripts/gen_protos.py; never edit."""
