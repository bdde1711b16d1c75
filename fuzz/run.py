"""`python -m fuzz.run TARGET [libFuzzer flags...]`: fuzz one target with atheris.

`make fuzz` runs every target for a while with a corpus kept in fuzz/corpus/TARGET (not in
git); `make test` runs each for a bounded number of inputs (tests/unit/test_fuzz.py). The seed
inputs below start libFuzzer from valid messages, so it mutates towards the interesting edges.
Prints libFuzzer's summary, `Done N runs in S second(s)`, and exits non-zero on a finding.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris

from pico import log

with atheris.instrument_imports(include=["pico", "fuzz"]):
    from fuzz import seeds
    from fuzz.targets import TARGETS


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        names = ",".join(TARGETS)
        print(f"usage: python -m fuzz.run {{{names}}} [libFuzzer flags]", file=sys.stderr)
        return 2
    name, flags = sys.argv[1], sys.argv[2:]
    log.configure("error")  # refusals of bad input are logged at warn: not news here
    corpus = [f for f in flags if not f.startswith("-")]
    if not corpus:
        # No corpus directory given: start from the seeds in a scratch one.
        scratch = Path(tempfile.mkdtemp(prefix=f"pico-fuzz-{name}-"))
        corpus = [str(scratch)]
        flags = [*flags, str(scratch)]
    for i, seed in enumerate(seeds.SEEDS[name]):
        (Path(corpus[0]) / f"seed-{i}").write_bytes(seed)
    atheris.Setup([sys.argv[0], *flags], TARGETS[name])
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
