"""House rules a reader checks first: line budgets, pure-PyTorch run-time imports, CI runs the README's commands."""
import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET = {"model.py": 1300, "data.py": 900, "eval.py": 600, "train.py": 500, "perceivers.py": 200, "lora.py": 150,
          "merge.py": 150, "world.py": 350, "scorers.py": 350, "formats.py": 500}
RUNTIME_LIBS = {"torch", "safetensors", "tokenizers", "PIL", "numpy", "tqdm", "huggingface_hub"}


def runtime_modules():
    return sorted(f for f in os.listdir(ROOT) if f.endswith(".py"))


def lines(name):
    with open(os.path.join(ROOT, name)) as f:
        return sum(1 for _ in f)


def test_line_budgets():
    assert set(runtime_modules()) <= set(BUDGET), f"new top-level module: {set(runtime_modules()) - set(BUDGET)}"
    over = {f: lines(f) for f in runtime_modules() if lines(f) > BUDGET[f]}
    assert not over, f"over budget: {over}"
    assert sum(lines(f) for f in runtime_modules()) <= 4000


def test_runtime_imports_only_allowed_libraries():
    local = {f[:-3] for f in runtime_modules()}
    std = set(__import__("sys").stdlib_module_names)
    for f in runtime_modules():
        tree = ast.parse(open(os.path.join(ROOT, f)).read())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            for n in names:
                top = n.split(".")[0]
                assert top in RUNTIME_LIBS | local | std, f"{f} imports {n}"


def test_ci_runs_the_readme_commands():
    readme = open(os.path.join(ROOT, "README.md")).read()
    ci = open(os.path.join(ROOT, ".ci", "run")).read().splitlines()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", readme, re.S).group(1)
    commands = [c for c in block.splitlines() if c and not c.startswith("#")]
    assert len(commands) == 2
    for c in commands:
        assert c in ci, f"README command not run by .ci/run: {c}"
