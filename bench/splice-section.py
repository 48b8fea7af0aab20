#!/usr/bin/env python3
"""splice-section.py NAME FILE < TEXT

Replaces what is between the lines `<!-- NAME:begin -->` and
`<!-- NAME:end -->` in FILE (BENCHMARKS.md) with TEXT, leaving the rest of
the file alone. Used by bench/overlay.sh and bench/containers.sh (--write);
phoenix-bench does the same for its `supervision` section.
"""

import os
import sys


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip())
    name, path = sys.argv[1], sys.argv[2]
    body = sys.stdin.read().strip("\n") + "\n"
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    with open(path) as f:
        text = f.read()
    a = text.find(begin)
    b = text.find(end, a + len(begin)) if a >= 0 else -1
    if a < 0 or b < 0:
        sys.exit(f"{path}: no `{begin}` ... `{end}` markers; not touching it")
    text = text[: a + len(begin)] + "\n" + body + text[b:]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, os.stat(path).st_mode & 0o7777)  # not the caller's umask (overlay.sh: 077)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
