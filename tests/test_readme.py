"""The README is the front door: its commands match CI and its code examples run."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
LIBRARY = (ROOT / "docs" / "library.md").read_text()   # the Library API examples the README links


def test_ci_runs_the_readme_test_command():
    bash_blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    test_cmd = next(b.strip() for b in bash_blocks if "pytest" in b)
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci


def test_readme_opens_with_the_main_experiment_command():
    first = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    assert "python -m experiments.min_ratio" in first and "pip install -r requirements.txt" in first


def test_library_api_examples_run(capsys):
    section = README.split("## Library API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    more = re.findall(r"```python\n(.*?)```", LIBRARY, re.S)
    assert blocks and more
    namespace: dict = {}
    for name, block in [("README.md", b) for b in blocks] + [("docs/library.md", b) for b in more]:
        exec(compile(block, name, "exec"), namespace)
    out = capsys.readouterr().out
    assert "[-2.  2.] 1 1 0" in out
    assert "saddle_proven True" in out
    assert out.count("(Array(-0.68376377") == 2   # the data axis example: mesh == one device
