import subprocess
import sys

from sailvl.cli import main


def test_help_lists_subcommands():
    r = subprocess.run([sys.executable, "-m", "sailvl", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for cmd in ("demo", "convert"):
        assert cmd in r.stdout


def test_unknown_subcommand_is_a_clear_error():
    r = subprocess.run([sys.executable, "-m", "sailvl", "frobnicate"], capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice: 'frobnicate'" in r.stderr


def test_demo_runs_and_reloads_exactly(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("reload bit-exact: True") == 2
    assert (tmp_path / "dense" / "config.json").exists() and (tmp_path / "moe" / "tokenizer.json").exists()
