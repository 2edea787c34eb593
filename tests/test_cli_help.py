"""`pagoda --help` as a newcomer reads it: every flag of every command described with its
default, sizes with units, every benchmark listed, and no heavy import behind the help."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pagoda.adapters.cli import BENCHMARKS, BENCHMARKS_DIR, build_parser, main
from pagoda.backend.config import parse_bytes

HEAVY_MODULES = ("torch", "transformers", "uvicorn", "starlette", "httpx", "numpy",
                 "pagoda.backend.engine")


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_flag_of_every_command_has_a_description_and_a_default():
    for name, parser in subcommands().items():
        flags = [action for action in parser._actions
                 if action.option_strings and not isinstance(action, argparse._HelpAction)]
        for action in flags:
            flag = action.option_strings[-1]
            assert action.help, f"pagoda {name} {flag} has no description"
            if action.required:
                continue  # no default to show
            # The formatter appends "(default: X)" unless the text says it (it must, for None).
            assert "default" in action.help or action.default is not None, f"{name} {flag}"
        # ... and the rendered help shows it for each of them.
        optional = [action for action in flags if not action.required]
        assert parser.format_help().count("default") >= len(optional), name


def test_help_shows_defaults_as_values():
    text = subcommands()["serve"].format_help()
    for shown in ("(default: 16)", "(default: 8000)", "(default: 2048)", "default: 32 MiB)",
                  "(default: auto)"):
        assert shown in " ".join(text.split()), shown


def test_help_imports_nothing_heavy():
    """The help answers at once: no torch, transformers, web stack or engine behind it."""
    script = (
        "import json, sys\n"
        "from pagoda.adapters.cli import main\n"
        "for argv in (['--help'], ['serve', '--help'], ['worker', '--help'],\n"
        "             ['generate', '--help'], ['bench', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        f"print(json.dumps([m for m in {HEAVY_MODULES!r} if m in sys.modules]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=True)
    assert json.loads(done.stdout.splitlines()[-1]) == []


@pytest.mark.parametrize(("text", "expected"), [
    ("512MiB", 512 * 2**20), ("4GiB", 4 * 2**30), ("1.5e9", 1_500_000_000), ("2G", 2 * 2**30),
    ("1GB", 10**9), ("64k", 64 * 1024), ("1000000", 1_000_000), (" 3 MiB ", 3 * 2**20),
])
def test_sizes_take_units(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("junk", ["lots", "1GiBx", "-1G", "", "1.2.3", "2 Gi", "GiB", "1e"])
def test_junk_sizes_are_refused(junk):
    with pytest.raises(ValueError, match="expected a size such as 512MiB"):
        parse_bytes(junk)


def test_kv_cache_memory_bytes_flag_takes_units_and_refuses_junk_in_one_line(capsys):
    args = build_parser().parse_args(["serve", "--kv-cache-memory-bytes", "1GiB"])
    assert args.kv_cache_memory_bytes == 2**30
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--kv-cache-memory-bytes", "plenty"])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--kv-cache-memory-bytes" in error and "'plenty'" in error


def test_bench_lists_every_benchmark_script():
    runnable = {path.name for path in Path(BENCHMARKS_DIR).glob("*.py")
                if 'if __name__ == "__main__":' in path.read_text()}
    assert {script for script, _ in BENCHMARKS.values()} == runnable
    text = " ".join(subcommands()["bench"].format_help().split())
    for kind, (_, about) in BENCHMARKS.items():
        assert f"{kind} {about}" in text
