"""The project's promises to a new user: the README's commands are what CI runs."""

import configparser
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = _bash_blocks(readme)
    test_cmds = [b for b in blocks if "pytest" in b]
    assert len(test_cmds) == 1, "the README must have exactly one test command"
    ci_lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_cmds[0] in ci_lines
    example_cmds = [b for b in blocks if "examples/quickstart.py" in b]
    assert len(example_cmds) == 1
    for cmd in (test_cmds[0], example_cmds[0]):
        assert "torch==2.13.0" in cmd  # never a multi-GB CUDA build


def test_setup_cfg_declares_what_the_code_needs():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    requires = cfg["options"]["install_requires"]
    for pkg in ("pyro-ppl", "torch", "numpy", "scipy", "arviz-base", "arviz-stats[xarray]"):
        assert pkg in requires
    extras = cfg["options.extras_require"]
    assert "hypothesis" in extras["test"] and "pytest" in extras["test"]
    assert "scikit-learn" in extras["examples"] and "scikit-learn" not in requires
    assert "sphinx" in extras["docs"]


def test_public_names_import():
    import pyro_symmetry as ps

    for name in ps.__all__:
        assert getattr(ps, name) is not None, name
    assert ps.PermutationSpec and ps.mlp_spec and ps.Pushforward and ps.models.BayesianMLP
