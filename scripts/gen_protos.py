"""Regenerate the Python code for every .proto under proto/ (or, with --check, fail if it would change).

Generated modules land beside the package path of their proto file: proto/deml/v1/x.proto -> deml/v1/x_pb2.py,
so generated imports (`from deml.v1 import x_pb2`) resolve without any rewriting.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generate(out_dir: Path) -> list[Path]:
    """Run protoc with the python, grpc and mypy plugins into out_dir; return the generated files."""
    protos = sorted(p.relative_to(PROTO_DIR) for p in PROTO_DIR.rglob("*.proto"))
    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *[str(p) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(p.relative_to(out_dir) for p in out_dir.rglob("*") if p.name.endswith(GENERATED_SUFFIXES))


def existing() -> list[Path]:
    """Generated files currently in the tree."""
    found: list[Path] = []
    for proto in PROTO_DIR.rglob("*.proto"):
        package_dir = ROOT / proto.parent.relative_to(PROTO_DIR)
        found.extend(p.relative_to(ROOT) for p in package_dir.glob("*") if p.name.endswith(GENERATED_SUFFIXES))
    return sorted(set(found))


def main() -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if regeneration would change anything")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        fresh = generate(out)
        if opts.check:
            stale = [str(p) for p in fresh if not (ROOT / p).exists() or not filecmp.cmp(out / p, ROOT / p, False)]
            extra = [str(p) for p in existing() if p not in fresh]
            if stale or extra:
                print("generated code is out of date; run scripts/gen_protos.py", file=sys.stderr)
                for name in stale + extra:
                    print(f"  {name}", file=sys.stderr)
                return 1
            print(f"generated code up to date ({len(fresh)} files)")
            return 0
        for p in existing():
            (ROOT / p).unlink()
        for p in fresh:
            (ROOT / p).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / p, ROOT / p)
            init = (ROOT / p).parent / "__init__.py"
            if not init.exists():
                init.write_text("")
        print(f"generated {len(fresh)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
