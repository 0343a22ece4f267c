"""Merge a bench report of a few new cells into the committed report of the same spec, and rewrite its json,
markdown and plots. A matrix runs in slices across machines and sessions, and a machine keeps only its own
cells' run directories, so `noisymix bench SPEC --only ... --out NEW` reports only what it ran; this puts those
cells into the full report. A cell finished in NEW replaces the committed one; every other cell is kept as
committed; the spec's settings and methods come from NEW, since it was read from the current spec file.

    noisymix bench benchmarks/crossmix.yaml --only 'pairflip40/selectmix_paper/*' --out /tmp/new
    python benchmarks/merge_report.py benchmarks/results/crossmix.json /tmp/new/crossmix.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path


def merged(committed: dict, new: dict) -> tuple[dict, list[str]]:
    """The committed report with NEW's finished cells in it; the ids taken from NEW."""
    if committed["name"] != new["name"]:
        raise SystemExit(f"the reports are of different specs: {committed['name']!r} and {new['name']!r}")
    cells = dict(committed["cells"])
    taken = [cid for cid, cell in new["cells"].items() if cell.get("status") in ("done", "failed")]
    for cid in new["cells"]:
        cells[cid] = new["cells"][cid] if cid in taken else cells.get(cid, new["cells"][cid])
    return {**committed, **{k: new[k] for k in ("settings", "methods", "curves", "base", "commit")},
            "cells": cells}, taken


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("committed", type=Path, help="the committed report's json (rewritten in place)")
    parser.add_argument("new", type=Path, help="the json of a bench run of some cells (--out elsewhere)")
    args = parser.parse_args()
    from noisymix.launch.bench import write_report

    results, taken = merged(json.loads(args.committed.read_text()), json.loads(args.new.read_text()))
    if not taken:
        raise SystemExit(f"{args.new} has no finished cell: nothing to merge")
    command = results.pop("command")
    write_report(results, args.committed.parent, command)
    print(f"merged {len(taken)} cell(s) into {args.committed}: {', '.join(taken)}")
    print(f"({shlex.join([Path(sys.executable).name, *sys.argv])})")


if __name__ == "__main__":
    main()
