"""`make bench` rewrites only its own part of docs/benchmarks.md: the sections after the
mark (other benches' figures) are kept, on the real file and on made-up ones."""

from __future__ import annotations

from pathlib import Path

from bench.run import KEEP_MARK, kept_sections

ROOT = Path(__file__).resolve().parents[2]


def test_the_sections_after_the_mark_are_kept(tmp_path: Path) -> None:
    out = tmp_path / "b.md"
    assert kept_sections(out) == ""  # no file yet
    out.write_text("# old run\nold figures\n")
    assert kept_sections(out) == ""  # no mark: nothing to keep
    out.write_text(f"# old run\nold figures\n{KEEP_MARK}\n\n## kept\nhand figures\n")
    kept = kept_sections(out)
    assert kept == f"\n{KEEP_MARK}\n\n## kept\nhand figures\n"
    out.write_text("# new run\n" + kept)  # what main() writes
    assert kept_sections(out) == kept  # and again, unchanged


def test_docs_benchmarks_has_the_mark_before_the_hand_sections() -> None:
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    kept = kept_sections(ROOT / "docs" / "benchmarks.md")
    assert text.count(KEEP_MARK) == 1
    assert "## Kernel path" in kept and "## Data path" not in kept
