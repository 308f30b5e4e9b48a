"""``rgs simulate-dsa``: a tiny run end to end, no-clobber, one-line errors."""
import json

from rgs_engine.io.dsa_case import load_dsa
from cli_helpers import assert_one_line_error, invoke

TINY = ("--frames", 6, "--grid", 16, "--det", 16)


def test_tiny_run_writes_a_readable_case(tmp_path):
    out = tmp_path / "case"
    result = invoke("simulate-dsa", out, *TINY, "--noise", "1e5,2", "--seed", 3)
    assert result.exit_code == 0, result.output
    assert "vessel tree" in result.stdout and f"wrote {out}" in result.stdout
    data = load_dsa(out)
    assert tuple(data.projections.shape) == (6, 16, 16) and data.grid.shape == (16, 16, 16)
    assert data.attributes["time_unit"] == "s" and data.ground_truth is not None
    truth = json.loads((out / "ground_truth" / "truth.json").read_text())
    assert truth["parameters"]["run"]["noise"] == [1e5, 2.0] and truth["parameters"]["run"]["seed"] == 3
    assert (out / "ground_truth" / "vessels_surface.ply").is_file()


def test_refuses_to_overwrite_without_force(tmp_path):
    out = tmp_path / "case"
    assert invoke("simulate-dsa", out, *TINY).exit_code == 0
    before = (out / "fill_run.nii.gz").read_bytes()
    assert_one_line_error(invoke("simulate-dsa", out, *TINY, "--seed", 1), "exists: pass --force")
    assert (out / "fill_run.nii.gz").read_bytes() == before
    assert invoke("simulate-dsa", out, *TINY, "--seed", 1, "--force").exit_code == 0
    assert (out / "fill_run.nii.gz").read_bytes() != before


def test_bad_options_are_one_line_errors(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for args, text in (((tmp_path / "a", "--frames", 1), "at least 2 frames"),
                       ((tmp_path / "b", "--grid", 4), "--grid 4 is too small"),
                       ((tmp_path / "c", "--det", 4), "--det 4 is too small"),
                       ((tmp_path / "d", "--noise", "lots"), "write PHOTONS,SIGMA"),
                       ((a_file,), "is not a folder")):
        assert_one_line_error(invoke("simulate-dsa", *args), text)
    assert not any((tmp_path / n).exists() for n in "abcd")
