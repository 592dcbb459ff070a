"""Run one fuzz target under atheris (coverage-guided, libFuzzer underneath).

    python -m tests.fuzz.run TARGET [libFuzzer flags] [corpus dirs]
    python -m tests.fuzz.run sip -runs=1000000          # a long local run
    python -m tests.fuzz.run --list                     # the targets

Without a corpus directory, the working corpus is `.fuzz/corpus/TARGET` (created;
libFuzzer adds the inputs that reach new coverage to it, so a later run starts
where this one stopped) and the target's seed directories (tests/fixtures,
tests/fuzz/seeds) are read after it, never written. A crash (any exception but the
target's declared error) stops the run with the traceback and writes the input to
`.fuzz/artifacts/TARGET/crash-<sha1>`; replay it with
`python -m tests.fuzz.run TARGET .fuzz/artifacts/TARGET/crash-<sha1>`.
Defaults added unless given: `-max_len` and `-dict` (the target's, from
tests/fuzz/dicts), `-artifact_prefix`, `-timeout=10` (an input that takes 10 s
is a crash too: parsers must be linear).
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

# Only our code is instrumented for coverage; the numba kernels are left alone (their
# Python bytecode is compiled by numba, which must not see atheris' hooks).
with atheris.instrument_imports(include=["pbx", "media"], exclude=["media.kernels"]):
    from tests.fuzz.targets import TARGETS


def libfuzzer_argv(name: str, args: list[str], workdir: Path = Path(".fuzz")) -> list[str]:
    """The argv for libFuzzer: the caller's flags and corpus dirs, plus our defaults."""
    target = TARGETS[name]
    flags = [a for a in args if a.startswith("-")]
    paths = [a for a in args if not a.startswith("-")]
    given = {f.split("=", 1)[0] for f in flags}
    defaults = {
        "-max_len": str(target.max_len),
        "-artifact_prefix": f"{workdir / 'artifacts' / name}/",
        "-timeout": "10",
    }
    if target.dictionary is not None:
        defaults["-dict"] = str(target.dictionary)
    for flag, value in defaults.items():
        if flag not in given:
            flags.append(f"{flag}={value}")
    Path(dict(f.split("=", 1) for f in flags if "=" in f)["-artifact_prefix"]).mkdir(
        parents=True, exist_ok=True)
    if not paths:
        corpus = workdir / "corpus" / name
        corpus.mkdir(parents=True, exist_ok=True)
        paths = [str(corpus)] + [str(d) for d in target.seeds]
    return [sys.argv[0], *flags, *paths]


def main() -> None:
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help", "--list"):
        print(__doc__)
        print("targets:", " ".join(TARGETS))
        return
    name, rest = args[0], args[1:]
    if name not in TARGETS:
        sys.exit(f"unknown target {name!r}; targets: {' '.join(TARGETS)}")
    atheris.Setup(libfuzzer_argv(name, rest), TARGETS[name].run)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
