"""Does a regenerated workspace agree with the committed results? The headline numbers of ``reports/metrics/``, read
from the workspace and from a git revision, each judged by one stated rule (:func:`judge`).

Byte identity holds only on the same CPU model, torch build and thread count; elsewhere training turns last-bit
differences into changes as large as a new seed, so a number "agrees" when its difference is within the ~95% range
of the run-to-run (or test-sampling) spread.
"""

from __future__ import annotations

import fnmatch
import json
import math
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from rich.table import Table
from rich.text import Text

from pipeline.console import format_value
from pipeline.errors import UserError
from pipeline.stats import Z95

SAME, CONSISTENT, INCONSISTENT, MISSING = "same bytes", "consistent", "inconsistent", "missing"
AGREE = (SAME, CONSISTENT)  # every other verdict makes the check fail
SEEDS, STDERR = "seeds", "stderr"  # what a scale is made of: the seed spread, or the standard errors


@dataclass(frozen=True)
class Claim:
    """One headline number. ``files``: a glob relative to the root (wildcards in the file name only). ``value``,
    ``stderr``, ``seed_std``: key paths inside the JSON, ``/``-separated (keys such as ``0.5`` hold dots); a ``*``
    runs over the keys found at that level on either side and binds the same key in ``stderr`` and ``seed_std``.
    ``exact``: the value must be equal (a boolean certificate, an integer count); no scale."""

    files: str
    value: str
    stderr: str | None = None
    seed_std: str | None = None
    exact: bool = False


M = "reports/metrics"
TOY, DS = f"{M}/toy.json", "datasets/*"  # toy.json holds one entry per 2-D dataset
C = "classifier/*"  # summary.json holds one entry per classifier
CLAIMS: tuple[Claim, ...] = (
    # Table 2: each classifier's test error, the mean over its seeds, judged by its spread over seeds (a run per
    # (c, seed) is one draw of that spread, so the per-run files are not judged one by one).
    Claim(f"{M}/summary.json", f"{C}/test_error_pct", f"{C}/test_error_stderr_pct", f"{C}/test_error_seed_std_pct"),
    # `stderr_examples` (test-set sampling), not `stderr` (Hutchinson probes on fixed examples, 10x smaller): a
    # retrained flow changes the per-example values, which the probe error alone does not cover.
    Claim(f"{M}/evaluate_flow.json", "bpd", "stderr_examples", "bpd_seed_std"),
    Claim(TOY, f"{DS}/iresnet_minus_glow/mean", f"{DS}/iresnet_minus_glow/stderr", f"{DS}/iresnet_minus_glow_seed_std"),
    Claim(TOY, f"{DS}/iresnet_nll", f"{DS}/iresnet_nll_stderr", f"{DS}/iresnet_nll_seed_std"),
    Claim(TOY, f"{DS}/glow_nll", f"{DS}/glow_nll_stderr", f"{DS}/glow_nll_seed_std"),
    Claim(TOY, "iresnet_wins", exact=True),
    Claim(f"{M}/singular_values.json", "models/*/guaranteed_inverse", exact=True),
)


@dataclass(frozen=True)
class Judgement:
    """The rule's answer for one number: ``difference`` = regenerated - committed, the ``scale`` it is judged
    against and what that scale is (``basis``), and the ``verdict``."""

    difference: float | None
    scale: float | None
    basis: str
    verdict: str


def judge(
    regenerated: float | bool,
    committed: float | bool,
    *,
    stderr: tuple[float | None, float | None] = (None, None),
    seed_std: tuple[float | None, float | None] = (None, None),
    exact: bool = False,
    same_bytes: bool = False,
) -> Judgement:
    """The reproduction rule for one headline number; pairs are (committed, regenerated).

    - ``same bytes`` when the whole metrics file is byte-identical to the committed one;
    - booleans and ``exact`` claims (certificates, counts): ``consistent`` when equal, else ``inconsistent``;
    - numbers: ``consistent`` when ``|regenerated - committed| <= Z95 * scale`` (exactly equal numbers always are),
      else ``inconsistent``. With a seed spread (the std over training seeds) on either side,
      ``scale = sqrt(seed_std_c^2 + seed_std_r^2)``, i.e. ``sqrt(2) * seed_std``: two independent runs differ by
      sqrt(2) sigma (a side without one borrows the other's; for a mean over n seeds, as the toy's NLLs, the spread
      of one seed is used, so the rule is conservative by sqrt(n)). Otherwise ``scale = sqrt(se_c^2 + se_r^2)`` from the
      metric's own standard errors. A missing or NaN scale judges any nonzero difference inconsistent.
    """
    if exact or isinstance(regenerated, bool) or isinstance(committed, bool):
        difference, scale, basis, ok = None, None, "exact", regenerated == committed
    else:
        difference = float(regenerated) - float(committed)
        c, r = seed_std
        if c is not None or r is not None:
            c, r, basis = (c if c is not None else r), (r if r is not None else c), SEEDS
        else:
            (c, r), basis = stderr, STDERR
        scale = math.hypot(c, r) if c is not None and r is not None else None
        ok = difference == 0 or (scale is not None and abs(difference) <= Z95 * scale)
    verdict = SAME if same_bytes else CONSISTENT if ok else INCONSISTENT
    return Judgement(difference, scale, basis, verdict)


@dataclass(frozen=True)
class Row:
    """One line of the report: a claim of one file (``claim`` empty for a file-level row)."""

    file: str
    claim: str
    regenerated: Any
    committed: Any
    judgement: Judgement
    note: str = ""

    @property
    def agrees(self) -> bool:
        return self.judgement.verdict in AGREE


class Git:
    """Read-only access to one revision of the repository that holds ``root`` (which may be a subfolder)."""

    def __init__(self, root: Path, rev: str) -> None:
        self.root, self.rev = root, rev
        try:
            self.prefix = self._git("rev-parse", "--show-prefix").decode().strip()
        except FileNotFoundError:
            raise UserError("check-repro needs `git` on PATH: install git, then run it again.") from None
        except subprocess.CalledProcessError:
            raise UserError(
                f"{root} is not inside a git repository: check-repro compares with committed results, so run it in a "
                "clone of the project (or point --root at one)."
            ) from None
        try:
            self._git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
        except subprocess.CalledProcessError:
            raise UserError(f"unknown revision {rev!r} in {root}: pass --against a commit, branch or tag.") from None

    def _git(self, *args: str) -> bytes:
        return subprocess.run(["git", "-C", str(self.root), *args], capture_output=True, check=True).stdout

    def files(self, folder: str) -> list[str]:
        """Paths (relative to the root) of the files under ``folder`` at the revision."""
        try:
            out = self._git("ls-tree", "-r", "--name-only", "--full-tree", self.rev, "--", self.prefix + folder)
        except subprocess.CalledProcessError:
            return []
        return [name[len(self.prefix) :] for name in out.decode().splitlines()]

    def read(self, path: str) -> bytes | None:
        """The committed bytes of ``path`` (relative to the root), or None when the revision lacks it."""
        try:
            return self._git("show", f"{self.rev}:{self.prefix}{path}")
        except subprocess.CalledProcessError:
            return None


def matching(root: Path, git: Git, pattern: str) -> list[str]:
    """The files that match ``pattern`` in the workspace or at the revision (sorted, each once)."""
    folder, name = str(PurePosixPath(pattern).parent), PurePosixPath(pattern).name
    on_disk = [f"{folder}/{p.name}" for p in (root / folder).glob(name) if p.is_file()]
    committed = [p for p in git.files(folder) if fnmatch.fnmatchcase(p, pattern)]
    return sorted(set(on_disk) | set(committed))


_ABSENT = object()


def lookup(doc: Any, parts: list[str]) -> Any:
    """``doc[parts[0]][parts[1]]...``, or ``_ABSENT`` where a key is missing or a value null."""
    for part in parts:
        if not isinstance(doc, dict) or doc.get(part) is None:
            return _ABSENT
        doc = doc[part]
    return doc


def expand(pattern: str, docs: tuple[Any, Any]) -> Iterator[list[str]]:
    """Every concrete key path of ``pattern``: a ``*`` runs over the keys at that level on either side."""

    def walk(parts: list[str], done: list[str]) -> Iterator[list[str]]:
        if not parts:
            yield done
            return
        head, rest = parts[0], parts[1:]
        if head != "*":
            yield from walk(rest, [*done, head])
            return
        keys: dict[str, None] = {}  # insertion-ordered union: committed keys first
        for doc in docs:
            level = lookup(doc, done)
            keys.update(dict.fromkeys(level if isinstance(level, dict) else ()))
        for key in keys:
            yield from walk(rest, [*done, key])

    yield from walk(pattern.split("/"), [])


def bind(pattern: str | None, concrete: list[str], template: str) -> list[str] | None:
    """``pattern`` with its ``*`` replaced by the keys that ``concrete`` (an expansion of ``template``) bound."""
    if pattern is None:
        return None
    keys = iter(key for key, part in zip(concrete, template.split("/")) if part == "*")
    return [next(keys) if part == "*" else part for part in pattern.split("/")]


def optional_number(doc: Any, parts: list[str] | None) -> float | None:
    """A spread (standard error, seed std) when the file carries it as a number, else None."""
    value = _ABSENT if parts is None else lookup(doc, parts)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def claim_rows(claim: Claim, file: str, docs: tuple[Any, Any], same_bytes: bool) -> Iterator[Row]:
    """The rows of ``claim`` in one file; ``docs``: (committed, regenerated) parsed JSON."""
    template = claim.value.split("/")
    for parts in expand(claim.value, docs):
        name = "/".join(parts[template.index("*") :] if "*" in template else parts)  # the bound keys name the row
        committed, regenerated = (lookup(doc, parts) for doc in docs)
        absent = [side for side, v in (("committed", committed), ("workspace", regenerated)) if v is _ABSENT]
        if absent:
            note = f"`{'/'.join(parts)}` missing in the {' and the '.join(absent)} file"
            yield Row(file, name, regenerated, committed, Judgement(None, None, "", MISSING), note)
            continue
        numbers = all(isinstance(v, (int, float)) for v in (committed, regenerated))
        if not numbers and not claim.exact:
            note = f"`{'/'.join(parts)}` is not a number: {committed!r} vs {regenerated!r}"
            yield Row(file, name, regenerated, committed, Judgement(None, None, "", MISSING), note)
            continue
        stderr = tuple(optional_number(doc, bind(claim.stderr, parts, claim.value)) for doc in docs)
        seed_std = tuple(optional_number(doc, bind(claim.seed_std, parts, claim.value)) for doc in docs)
        result = judge(
            regenerated, committed, stderr=stderr, seed_std=seed_std, exact=claim.exact, same_bytes=same_bytes
        )
        note = ""
        if result.verdict == INCONSISTENT and result.scale is None and result.basis == STDERR:
            result = Judgement(result.difference, None, "", MISSING)
            stderr_key = "/".join(bind(claim.stderr, parts, claim.value) or ["(none declared)"])
            note = f"no standard error `{stderr_key}` on both sides and no seed spread to judge by"
        yield Row(file, name, regenerated, committed, result, note)


def parse(data: bytes, side: str) -> tuple[Any, str]:
    """A metrics file's JSON, or None and why not."""
    try:
        return json.loads(data), ""
    except (ValueError, UnicodeDecodeError) as err:
        return None, f"the {side} file is not JSON: {err}"


def compare(root: Path, rev: str = "HEAD", claims: tuple[Claim, ...] = CLAIMS) -> list[Row]:
    """One row per claim of every metrics file, regenerated (on disk under ``root``) against committed (at ``rev``),
    plus one ``missing`` row per file that either side lacks. Raises :class:`UserError` without a git repository."""
    git = Git(root, rev)
    files: dict[str, list[Claim]] = {}
    for claim in claims:
        for file in matching(root, git, claim.files):
            files.setdefault(file, []).append(claim)
    rows: list[Row] = []
    for file, its_claims in files.items():
        disk = root / file
        regenerated_bytes = disk.read_bytes() if disk.is_file() else None
        committed_bytes = git.read(file)
        if regenerated_bytes is None or committed_bytes is None:
            side = "the workspace" if regenerated_bytes is None else f"{rev}"
            rows.append(Row(file, "", None, None, Judgement(None, None, "", MISSING), f"file missing in {side}"))
            continue
        committed, bad_c = parse(committed_bytes, "committed")
        regenerated, bad_r = parse(regenerated_bytes, "workspace")
        if bad_c or bad_r:
            rows.append(Row(file, "", None, None, Judgement(None, None, "", MISSING), bad_c or bad_r))
            continue
        same = regenerated_bytes == committed_bytes
        for claim in its_claims:
            rows.extend(claim_rows(claim, file, (committed, regenerated), same))
    return rows


def where(row: Row) -> str:
    """The row's name: its file under reports/metrics/ (no ``.json``), then the claim's keys."""
    name = row.file.removeprefix(f"{M}/")
    return f"{name.removesuffix('.json')} {row.claim}".strip() if row.claim else name


STYLES = {SAME: "green", CONSISTENT: "green", INCONSISTENT: "bold red", MISSING: "bold red"}


def render(rows: list[Row], rev: str) -> Table:
    """The rows as a rich table: values, difference, the scale judged against (and its basis), verdict."""
    table = Table(title=f"check-repro: workspace against {rev} (consistent: |difference| <= {Z95} x scale)")
    numbers = ("regenerated", "committed", "difference", "scale")
    for name in ("claim", *numbers):
        table.add_column(name, justify="right" if name in numbers else "left")
    table.add_column("verdict", no_wrap=True)
    for row in rows:
        j = row.judgement
        values = [row.regenerated, row.committed, j.difference]
        cells = ["" if v is None or v is _ABSENT else format_value(v) for v in values]
        scale = j.basis if j.scale is None else f"{j.scale:.3g} {j.basis}"  # a tolerance: 3 digits are plenty
        table.add_row(*(Text(t) for t in (where(row), *cells, scale)), Text(j.verdict, style=STYLES[j.verdict]))
    return table


def verdict_lines(rows: list[Row]) -> list[str]:
    """One plain line per row (greppable in a log), then the overall verdict."""
    lines = []
    for row in rows:
        lines.append(f"{row.judgement.verdict}: {where(row)}" + (f" ({row.note})" if row.note else ""))
    bad = sum(not row.agrees for row in rows)
    if not rows:
        lines.append("check-repro: no metrics files found on either side")
    elif bad:
        lines.append(f"check-repro: {bad} of {len(rows)} rows inconsistent or missing: the results do not reproduce")
    else:
        lines.append(f"check-repro: all {len(rows)} rows agree with the committed results")
    return lines
