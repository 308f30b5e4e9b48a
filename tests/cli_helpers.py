"""Running the ``rgs`` Typer app in-process, shared by the CLI tests."""
import os
import signal

from typer.testing import CliRunner

try:  # the source tree's CLI (python -m pytest from the repository root)
    from cli.main import app
except ImportError:  # an installed rgs, tests run from elsewhere
    from rgs_cli.main import app


def invoke(*args):
    """Run ``rgs ARGS...`` (arguments converted with ``str``) and return the result."""
    return CliRunner().invoke(app, [str(a) for a in args])


def error_line(result) -> str:
    """The single ``error: ...`` line of a run that must exit 2 without a traceback."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def assert_one_line_error(result, text: str) -> None:
    """Exit 2 with one ``error: ...`` line that contains ``text``."""
    assert text in error_line(result), result.stderr


def interrupt_at(monkeypatch, cls, call: int, style: str) -> None:
    """Make the ``call``-th ``cls.step`` be interrupted: a real SIGINT after the step
    ("signal", as Ctrl-C arrives) or a KeyboardInterrupt raised before it ("raise")."""
    original = cls.step
    count = {"n": 0}

    def step(self):
        count["n"] += 1
        if count["n"] == call and style == "raise":
            raise KeyboardInterrupt
        result = original(self)
        if count["n"] == call and style == "signal":
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(cls, "step", step)
