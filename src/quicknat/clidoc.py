"""The command-line reference (``docs/cli.md``): generated from the parser, with the exit codes
and what counts as bad input (``python -m quicknat.cli --reference > docs/cli.md``)."""

from __future__ import annotations

import argparse
import os

EXIT_CODES = """## Exit codes

| code | meaning |
|---:|---|
| 0 | done |
| 2 | bad input or options: one line `quicknat: error: PATH: problem` per failure, nothing half-written; \
for `segment`, any scan that failed (the others are written) |
| 1 | an error inside quicknat that is not about the input (please report it) |
| 130 | interrupted (Ctrl-C); temporary files are removed, or cleaned up by the next run in that folder |

What counts as bad input (exit 2, no output for that scan):

- a header claiming more than 2^28 voxels (about 645^3; `--max-voxels` or `QUICKNAT_MAX_VOXELS`
  raises it), or an uncompressed file shorter than its header says: refused before any voxel is read;
- a constant image (all zero, say) or one with intensities beyond 1e30; a segmentation labelling
  less than 1 mL (no brain found);
- a config with an unknown key at any level, a value of the wrong type or out of range; a manifest
  whose fields, scan IDs or split IDs do not hold together; an empty train split;
- for `evaluate` and `prepare labelmaps`: label maps with non-integer or negative values, an empty
  map, an image given as a label map, or a map with no ID of the scheme (IDs outside the scheme are
  scored as background, with a warning naming them).

A NIfTI whose qform and sform disagree is used with the sform (nibabel's choice) and a warning.
"""


def reference_markdown(parser: argparse.ArgumentParser) -> str:
    """The CLI reference (docs/cli.md), generated from ``quicknat.cli.build_parser()`` (100 columns
    wide)."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        return _reference(parser)
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def _reference(parser: argparse.ArgumentParser) -> str:
    out = ["# quicknat command-line reference", "",
           "Generated from the parser (`python -m quicknat.cli --reference > docs/cli.md`); a test checks it "
           "is current.", "", "```text", parser.format_help().rstrip(), "```", "", *EXIT_CODES.splitlines(), ""]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        out += [f"## quicknat {name}", "", "```text", p.format_help().rstrip(), "```", ""]
        nested = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        for a in nested:
            for sname, sp in a.choices.items():
                out += [f"### quicknat {name} {sname}", "", "```text", sp.format_help().rstrip(), "```", ""]
    return "\n".join(out)
