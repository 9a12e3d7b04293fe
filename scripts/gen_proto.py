"""Compile proto/taskrun/v1/*.proto into src/v1 (or, with --check, compare against it)."""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "src" / "v1"
INIT = '"""Generated protobuf and gRPC modules for taskrun.v1 (scripts/gen-proto)."""\n'


def generate(into: Path) -> None:
    protos = sorted(
        str(p.relative_to(PROTO_DIR)) for p in (PROTO_DIR / "taskrun" / "v1").glob("*.proto")
    )
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={into}",
        f"--grpc_python_out={into}",
        f"--pyi_out={into}",
        *protos,
    ]
    subprocess.run(cmd, check=True, cwd=PROTO_DIR)
    (into / "taskrun" / "v1" / "__init__.py").write_text(INIT)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if src/v1 is not up to date")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = Path(tmp) / "taskrun" / "v1"
        if args.check:
            names = sorted(p.name for p in fresh.iterdir() if p.is_file())
            current = (
                sorted(p.name for p in OUT_DIR.glob("*") if p.is_file()) if OUT_DIR.exists() else []
            )
            _, mismatch, errors = filecmp.cmpfiles(fresh, OUT_DIR, names, shallow=False)
            if names != current or mismatch or errors:
                stale = sorted(set(mismatch) | set(errors) | set(names) ^ set(current))
                print(
                    f"src/v1 is stale ({', '.join(stale)}): run scripts/gen-proto", file=sys.stderr
                )
                return 1
            print("src/v1 is up to date")
            return 0
        if OUT_DIR.exists():
            shutil.rmtree(OUT_DIR)
        shutil.copytree(fresh, OUT_DIR)
        print(f"generated {len(list(OUT_DIR.glob('*.py*')))} files in src/v1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
