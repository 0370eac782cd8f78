"""``claims.yaml``: every section's finding is a template that parses, names only what its function passes (an
unknown name is an error, never an empty string), and the filters it writes with say what they promise."""

from __future__ import annotations

import jinja2
import pytest

from pipeline.report.claims import environment, finding, listed, load_claims, plural


def test_every_section_has_a_finding_template() -> None:
    sections = load_claims()["sections"]
    assert [s["key"] for s in sections if not s.get("finding")] == []
    for section in sections:
        environment().parse(section["finding"])  # a syntax error names the section's template


def test_a_name_the_function_does_not_pass_is_an_error() -> None:
    with pytest.raises(jinja2.UndefinedError, match="total"):
        finding("runcost", throughput=None)


def test_the_filters() -> None:
    assert listed([]) == "none" and listed(["a", 2]) == "a, 2"
    assert plural(1, "seed") == "1 seed" and plural(3, "seed") == "3 seeds"
    render = environment().from_string
    assert render('{{ x | f(".2f") }} {{ y | num(".1e") }} {{ z | signed }}').render(x=1, y=None, z=-2.2) == (
        "1.00 n/a −2.20"
    )
    assert render("{{ a | name }}, {{ b | name }}, {{ c | yes_no }}").render(a="0.9", b="vanilla", c=False) == (
        "c = 0.9, vanilla, no"
    )


def test_a_finding_fills_its_template() -> None:
    text = finding("runcost", total=61.4, throughput={"vanilla": 300.0, "label": "0.9", "iresnet": 100.0})
    assert text.startswith("the runs took 61 s together")
    assert text.endswith("; training throughput vanilla 300 img/s vs c = 0.9 100 img/s (3.0x).")
    assert finding("runcost", total=61.4, throughput=None).endswith("wall time is less).")
