"""One document for the three renderers (optcli/report/document.py), and the runner holding a pass's details to the
model the pass registers: no model run."""

from __future__ import annotations

import re

import pytest
from report_sections import assert_same_sections
from test_report_render import EVIL, make_report


def test_markdown_html_and_terminal_show_the_same_sections():
    titles = assert_same_sections(make_report())
    assert f"{EVIL}: most pruned layers" in titles and f"{EVIL}: training" in titles
    assert "3-quantize: search (target 0.95)" in titles
    assert titles[:4] == ["Steps", "What each step did", "Gates", "Warnings"]


def test_a_step_of_a_type_without_a_view_still_shows_its_settings_and_sections():
    report = make_report()
    report["recipe"]["passes"][0] = {"type": "newpass", "rank": 8}
    report["steps"][1]["type"] = "newpass"
    report["steps"][1]["details"]["changes"] = ["fused 3 LayerNorms"]
    from optcli.report import render_markdown

    md = render_markdown(report)
    assert "- **1-export**: rank=8" in md and "## 1-export: graph changes" in md
    assert_same_sections(report)


def test_a_pass_whose_details_break_its_model_fails_as_that_pass():
    from optcli.errors import PassFailed
    from optcli.passes import get_pass
    from optcli.passes.base import check_details

    check_details(get_pass("export"), "1-export", {"opset": 18, "exporter": "dynamo", "anything": [1]})
    with pytest.raises(PassFailed, match=re.escape("pass 1-export failed") + ".*details.opset"):
        check_details(get_pass("export"), "1-export", {"opset": "eighteen"})
