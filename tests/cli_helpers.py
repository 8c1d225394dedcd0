"""The CLI as tests drive it, and the one-line error contract they check."""

from __future__ import annotations

from click.testing import CliRunner


def run_cli(*args: str):
    from unclip.cli import cli

    return CliRunner().invoke(cli, list(args))


def assert_one_line_error(result, *fragments: str) -> None:
    """Exit 1, exactly one stderr line `unclip: error: ...` holding every fragment, no traceback
    (besides `unclip: info: loading ...` notes)."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines()
             if line.strip() and not line.startswith("unclip: info: ")]
    assert len(lines) == 1 and lines[0].startswith("unclip: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output
