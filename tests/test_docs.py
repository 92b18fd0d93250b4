"""What README.md, docs/ and the configs' comments say agrees with itself and with the Makefile."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
MAKEFILE = (ROOT / "Makefile").read_text()


def make_variable(name: str) -> str:
    return re.search(rf"^{name} :?= (.+)$", MAKEFILE, re.M)[1]


def test_the_test_suite_takes_one_length_of_time_everywhere():
    readme = re.search(r"make test .*about (\d+) minutes", README)[1]
    testing = re.search(r"in about (\d+) minutes", (ROOT / "docs/testing.md").read_text())[1]
    assert readme == testing


def test_the_b0_config_describes_the_demo_overrides_the_makefile_makes():
    header = "".join(line for line in (ROOT / "configs/b0.yaml").read_text().splitlines() if line.startswith("#"))
    student, distill = make_variable("DEMO_STUDENT"), make_variable("DEMO_DISTILL")
    pretrained = re.search(r"student_pretrained=(\S+)", distill)[1]
    assert student in header and f"student_pretrained={pretrained}" in header


def test_the_readme_is_documentation_not_a_changelog():
    assert "previous commit" not in README and "four-row table" not in README
