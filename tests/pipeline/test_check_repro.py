"""``iresnet check-repro``: the rule on both sides of its thresholds, and the command on a temporary git repository
whose workspace metrics are edited after the commit."""

from __future__ import annotations

import copy
import json
import math
import subprocess
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from pipeline.check_repro import CONSISTENT, INCONSISTENT, MISSING, SAME, Row, compare, judge
from pipeline.cli import app
from pipeline.stats import Z95

runner = CliRunner()
BELOW, ABOVE = 1 - 1e-9, 1 + 1e-9  # just inside and just outside the threshold, far above rounding error

METRICS: dict[str, Any] = {  # the committed files' structure, cut to the keys check-repro reads
    "summary.json": {  # Table 2: each classifier's mean test error over seeds, its spread (null for one seed)
        "classifier": {
            "0.9": {"test_error_pct": 4.4, "test_error_stderr_pct": 0.65, "test_error_seed_std_pct": None},
            "vanilla": {"test_error_pct": 5.2, "test_error_stderr_pct": 0.7, "test_error_seed_std_pct": 0.4},
        },
    },
    "evaluate_flow.json": {"bpd": 1.452, "stderr": 0.00095, "stderr_examples": 0.0095},
    "toy.json": {
        "datasets": {
            name: {
                "iresnet_minus_glow": {"mean": -0.3, "stderr": 0.0034},
                "iresnet_nll": 2.61,
                "iresnet_nll_stderr": 0.0053,
                "glow_nll": 2.92,
                "glow_nll_stderr": 0.0054,
            }
            for name in ("8gaussians", "moons")
        },
        "iresnet_wins": 2,
    },
    "singular_values.json": {"models": {"0.9": {"guaranteed_inverse": True}, "vanilla": {"guaranteed_inverse": False}}},
}


def git(repo: Path, *args: str) -> str:
    cmd = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def write(root: Path, metrics: dict[str, Any]) -> None:
    for name, doc in metrics.items():
        path = root / "reports" / "metrics" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2) + "\n")


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A git repository with METRICS committed; the workspace copies are then free to edit."""
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # never find a repository above tmp_path
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q")
    write(root, METRICS)
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "results")
    return root


def by_name(rows: list[Row]) -> dict[str, Row]:
    return {f"{row.file.removeprefix('reports/metrics/')} {row.claim}".strip(): row for row in rows}


# The rule, on both sides of each threshold.


@pytest.mark.parametrize("seed_std", [(0.01, 0.01), (0.01, None), (None, 0.01)])
def test_seed_spread_threshold(seed_std: tuple[float | None, float | None]) -> None:
    scale = math.sqrt(2) * 0.01  # two independent runs differ by sqrt(2) seed stds
    stderr = (1e-9, 1e-9)  # ignored when a seed spread is present
    inside = judge(0.5 + Z95 * scale * BELOW, 0.5, stderr=stderr, seed_std=seed_std)
    outside = judge(0.5 - Z95 * scale * ABOVE, 0.5, stderr=stderr, seed_std=seed_std)
    assert inside.verdict == CONSISTENT and outside.verdict == INCONSISTENT
    assert inside.scale == pytest.approx(scale, rel=1e-12) and inside.basis == "seeds"


def test_stderr_threshold() -> None:
    se_c, se_r = 0.003, 0.004
    scale = math.sqrt(se_c**2 + se_r**2)
    inside = judge(1.0 - Z95 * scale * BELOW, 1.0, stderr=(se_c, se_r))
    outside = judge(1.0 + Z95 * scale * ABOVE, 1.0, stderr=(se_c, se_r))
    assert inside.verdict == CONSISTENT and outside.verdict == INCONSISTENT
    assert outside.scale == pytest.approx(scale, rel=1e-12) and outside.basis == "stderr"
    assert outside.difference == pytest.approx(Z95 * scale * ABOVE, rel=1e-9)  # regenerated - committed


def test_exact_claims_and_equal_numbers() -> None:
    assert judge(True, True).verdict == CONSISTENT
    assert judge(False, True).verdict == INCONSISTENT  # a certificate lost
    assert judge(3, 2, exact=True).verdict == INCONSISTENT  # a win count
    equal = judge(0.25, 0.25, stderr=(math.nan, None))  # no usable scale, but no difference either
    assert (equal.verdict, equal.difference) == (CONSISTENT, 0.0)
    assert judge(0.26, 0.25, stderr=(math.nan, 0.1)).verdict == INCONSISTENT
    assert judge(0.26, 0.25, stderr=(0.1, 0.1), same_bytes=True).verdict == SAME


# The comparison on a git repository.


def test_unchanged_workspace_is_same_bytes_and_exits_0(repo: Path) -> None:
    rows = compare(repo)
    assert {row.judgement.verdict for row in rows} == {SAME}
    names = set(by_name(rows))
    assert {"toy.json moons/iresnet_minus_glow/mean", "singular_values.json 0.9/guaranteed_inverse"} <= names
    assert len(rows) == 2 + 1 + 3 * 2 + 1 + 2  # classifiers, flow, 3 toy numbers x 2 datasets, wins, certificates
    result = runner.invoke(app, ["--root", str(repo), "check-repro"])
    assert result.exit_code == 0, result.output
    assert "same bytes: toy iresnet_wins" in result.output


def test_changes_within_and_beyond_the_scale(repo: Path) -> None:
    metrics = copy.deepcopy(METRICS)
    clf = metrics["summary.json"]["classifier"]
    clf["0.9"]["test_error_pct"] += Z95 * math.sqrt(2) * clf["0.9"]["test_error_stderr_pct"] * BELOW  # one seed
    clf["vanilla"]["test_error_pct"] += Z95 * math.sqrt(2) * clf["vanilla"]["test_error_seed_std_pct"] * ABOVE
    metrics["toy.json"]["glow_wins"] = 0  # a key no claim reads: the file changed, its claims did not
    write(repo, metrics)
    rows = by_name(compare(repo))
    assert rows["summary.json 0.9/test_error_pct"].judgement.verdict == CONSISTENT
    assert rows["summary.json 0.9/test_error_pct"].judgement.basis == "stderr"
    assert rows["summary.json vanilla/test_error_pct"].judgement.verdict == INCONSISTENT
    assert rows["summary.json vanilla/test_error_pct"].judgement.basis == "seeds"
    toy = rows["toy.json moons/iresnet_nll"].judgement
    assert (toy.verdict, toy.difference) == (CONSISTENT, 0.0)
    assert rows["evaluate_flow.json bpd"].judgement.verdict == SAME
    result = runner.invoke(app, ["--root", str(repo), "check-repro"])
    assert result.exit_code == 1
    assert "inconsistent: summary vanilla/test_error_pct" in result.output


def test_missing_file_and_key_are_rows_not_tracebacks(repo: Path) -> None:
    metrics = copy.deepcopy(METRICS)
    del metrics["toy.json"]["datasets"]["moons"]["glow_nll"]
    del metrics["toy.json"]["datasets"]["8gaussians"]["iresnet_nll_stderr"]
    metrics["toy.json"]["datasets"]["8gaussians"]["iresnet_nll"] += 0.001
    metrics["summary.json"]["classifier"]["0.5"] = {"test_error_pct": 4.0}  # not in the commit
    write(repo, metrics)
    (repo / "reports/metrics/evaluate_flow.json").unlink()
    rows = by_name(compare(repo))
    for name in (
        "toy.json moons/glow_nll",
        "toy.json 8gaussians/iresnet_nll",
        "summary.json 0.5/test_error_pct",
        "evaluate_flow.json",
    ):
        assert rows[name].judgement.verdict == MISSING, name
    assert "workspace" in rows["toy.json moons/glow_nll"].note
    assert "standard error" in rows["toy.json 8gaussians/iresnet_nll"].note
    assert "missing in the committed file" in rows["summary.json 0.5/test_error_pct"].note
    assert "missing in the workspace" in rows["evaluate_flow.json"].note
    result = runner.invoke(app, ["--root", str(repo), "check-repro"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)


def test_lost_certificate_is_inconsistent(repo: Path) -> None:
    metrics = copy.deepcopy(METRICS)
    metrics["singular_values.json"]["models"]["0.9"]["guaranteed_inverse"] = False
    write(repo, metrics)
    rows = by_name(compare(repo))
    assert rows["singular_values.json 0.9/guaranteed_inverse"].judgement.verdict == INCONSISTENT
    assert rows["singular_values.json vanilla/guaranteed_inverse"].judgement.verdict == CONSISTENT


def test_against_an_older_revision_from_a_subfolder_root(repo: Path) -> None:
    metrics = copy.deepcopy(METRICS)
    metrics["toy.json"]["iresnet_wins"] = 1
    write(repo, metrics)
    git(repo, "commit", "-q", "-am", "fewer wins")
    assert {row.judgement.verdict for row in compare(repo)} == {SAME}
    rows = by_name(compare(repo, "HEAD~1"))
    assert rows["toy.json iresnet_wins"].judgement.verdict == INCONSISTENT
    nested = repo.parent / "outer"  # the project as a subfolder of a larger repository
    (nested / "project").mkdir(parents=True)
    write(nested / "project", METRICS)
    git(nested, "init", "-q")
    git(nested, "add", "-A")
    git(nested, "commit", "-q", "-m", "results")
    assert {row.judgement.verdict for row in compare(nested / "project")} == {SAME}


def test_no_git_repository_is_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    write(tmp_path / "plain", METRICS)
    result = runner.invoke(app, ["--root", str(tmp_path / "plain"), "check-repro"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "not inside a git repository" in lines[0], result.output


def test_unknown_revision_is_one_line_error(repo: Path) -> None:
    result = runner.invoke(app, ["--root", str(repo), "check-repro", "--against", "no-such-branch"])
    assert result.exit_code == 1 and "unknown revision 'no-such-branch'" in result.output
    assert len(result.output.strip().splitlines()) == 1
