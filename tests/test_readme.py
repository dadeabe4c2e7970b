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


def test_analyse_your_own_model_example_runs(tmp_path, monkeypatch, capsys):
    """The README's own-model example as a new user runs it: mynet.py, the optax + Orbax training
    script, the app command (its summary and files), then the library call."""
    import subprocess
    import sys

    from tests.app_runner import ENV

    section = README.split("## Analyse your own trained model", 1)[1].split("\n## ", 1)[0]
    mynet, train, lib = re.findall(r"```python\n(.*?)```", section, re.S)
    command = re.findall(r"```bash\n(.*?)```", section, re.S)[0].strip()
    (tmp_path / "mynet.py").write_text(mynet)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    exec(compile(train, "README.md:train.py", "exec"), {})
    env = {**ENV, "PYTHONPATH": f"{ROOT}:{tmp_path}"}
    proc = subprocess.run([sys.executable, *command.split()[1:]], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "(nnx), P = 25, n = 64" in proc.stdout and "cast from float32" in proc.stdout
    assert "not critical" in proc.stdout and "refinement: moved" in proc.stdout
    for name in ("report.json", "analysis.csv", "spectrum.npz", "density.png", "config.json"):
        assert (tmp_path / "runs" / "analyze" / name).is_file(), name
    capsys.readouterr()
    exec(compile(lib, "README.md:library", "exec"), {})
    assert "not_critical True" in capsys.readouterr().out
