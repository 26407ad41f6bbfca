"""Remove one method's row from ``methods.METHODS`` in a scratch copy and run the suite: only its tests may fail.

This is the proof that the method table is the one place a method is listed (docs/architecture.md): with a row
gone, every test that fails must be one of that method's tests (its name or parameters name the method), and
each of those must fail (a method whose tests still pass without its row would be tested through some other list).

    .venv/bin/python scripts/check_method_rows.py                 # every row but "lora"
    .venv/bin/python scripts/check_method_rows.py dora qrlora     # some rows

"lora" is left out by default: every other method and most of the suite build on LoRA, so its row's tests are the
suite. Exit status 0 when every row passes the check. Takes about one suite run per row.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pytest

ROOT = Path(__file__).resolve().parent.parent
# the words that mark a test as the method's own, besides the row's name and title
ALIASES = {"dora": ("dora",), "adalora": ("adalora", "rank_allocator"), "qrlora": ("qrlora", "qr_lora")}


def drop_row(source: str, name: str) -> str:
    """``methods.py`` without the row ``"name": Method(...)`` of the ``METHODS`` dict."""
    lines = source.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith(f'    "{name}": Method('))
    depth, stop = 0, start
    for stop in range(start, len(lines)):
        depth += lines[stop].count("(") - lines[stop].count(")")
        if depth <= 0:
            break
    return "".join(lines[:start] + lines[stop + 1 :])


def pytest_runtest_logreport(report: pytest.TestReport | pytest.CollectReport) -> None:
    """Plugin hook (``-p check_method_rows`` in :func:`failures`): append each failing or erroring test to the file
    named by ``$CHECK_METHOD_ROWS_FAILED``, one JSON line ``{"id": node id, "why": crash message}`` (the summary
    line "FAILED <id> - <message>" cannot be split back when a parameter id holds spaces)."""
    if report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        why = crash.message if crash is not None else str(report.longrepr)
        with open(os.environ["CHECK_METHOD_ROWS_FAILED"], "a", encoding="utf-8") as out:
            out.write(json.dumps({"id": report.nodeid, "why": why[:600]}) + "\n")


def pytest_collectreport(report: pytest.CollectReport) -> None:
    """Plugin hook: a test file that cannot be collected counts as a failure under its path."""
    pytest_runtest_logreport(report)


def failures(tree: Path) -> dict[str, str]:
    """Node id -> crash message of each test that fails or errors in ``tree`` (the default suite, as ``make test``
    runs it)."""
    record = tree / ".failed-node-ids"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "check_method_rows", "tests"],
        cwd=tree,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(tree / "src"), str(tree / "scripts")]),
            "HF_HUB_OFFLINE": "1",
            "CHECK_METHOD_ROWS_FAILED": str(record),
        },
        capture_output=True,
        text=True,
    )
    lines = record.read_text(encoding="utf-8").splitlines() if record.exists() else []
    failed = {row["id"]: row["why"] for row in map(json.loads, lines)}
    if run.returncode not in (0, 1):  # 1: tests failed; anything else: pytest could not run the whole suite
        failed[f"<pytest exited with status {run.returncode}>"] = (
            f"{run.stdout[-1000:]}\n{run.stderr[-1000:]}"
        )
    return failed


def check(name: str, title: str) -> bool:
    """Run the suite without ``name``'s row (its title: ``title``); print and judge what failed."""
    with tempfile.TemporaryDirectory(prefix=f"lorakit-no-{name}-") as tmp:
        tree = Path(tmp)
        listed = ["git", "ls-files", "--cached", "--others", "--exclude-standard"]
        files = subprocess.run(listed, cwd=ROOT, capture_output=True, text=True, check=True)
        for path in files.stdout.splitlines():  # the working tree as git sees it: tracked and new files
            source, copy = ROOT / path, tree / path
            copy.parent.mkdir(parents=True, exist_ok=True)
            if source.is_symlink():
                copy.symlink_to(os.readlink(source))
            elif source.is_file():
                shutil.copy2(source, copy)
        methods = tree / "src/lorakit/methods.py"
        methods.write_text(drop_row(methods.read_text(), name))
        failed = failures(tree)
    words = {name, title.lower(), *ALIASES.get(name, ())}  # "QR-LoRA" in a benchmark row's id names it too
    foreign = [node for node in sorted(failed) if not any(w in node.lower() for w in words)]
    print(f"without the {name!r} row: {len(failed)} tests fail, {len(foreign)} of them not {name}'s")
    for node in foreign:
        why = failed[node].strip().replace("\n", "\n      ")
        print(f"  not {name}'s: {node}\n      {why}")
    if not failed:
        print(f"  no test failed: {name} is not tested through its row")
    return bool(failed) and not foreign


def main() -> int:
    sys.path.insert(0, str(ROOT / "src"))
    from lorakit.methods import METHODS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    rows = [name for name in METHODS if name != "lora"]
    parser.add_argument("names", nargs="*", help=f"rows to drop, one at a time (default: {', '.join(rows)})")
    names = parser.parse_args().names or rows
    results = [check(name, METHODS[name].title) for name in names]
    return 0 if all(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
