"""`make bento`: build the Bento and export the Containerfile `bentoml containerize` would use.

    python scripts/build_bento.py [OUTPUT_DIR]    (default: build/bento)

Prints the Bento's tag. The Containerfile lands in OUTPUT_DIR/Containerfile and the locked
requirements beside it, so an operator (or CI) can read what the image installs without Docker.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

os.environ["AI_SERVER_IMAGE_BUILD"] = "1"  # service.py declares the image's environment (see there)

import bentoml

ROOT = Path(__file__).resolve().parent.parent


def build(output_dir: Path) -> str:
    bento = bentoml.bentos.build_bentofile(str(ROOT / "bentofile.yaml"), build_ctx=str(ROOT))
    output_dir.mkdir(parents=True, exist_ok=True)
    bentoml.container.get_containerfile(bento.tag, output_path=str(output_dir / "Containerfile"))
    shutil.copyfile(Path(bento.path) / "env" / "python" / "requirements.txt", output_dir / "requirements.lock.txt")
    return str(bento.tag)


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "build" / "bento"))
