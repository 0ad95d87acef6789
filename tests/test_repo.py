"""House rules a reader checks first: line budgets and widths, a docstring per module saying what it owns, model.py
holds tensors only, the README lists every module, pure-PyTorch run-time imports, CI runs the README's commands.

The run-time modules are the top-level *.py files, whatever they are. Each rule is a function of a repository root
that returns its offenders, so test_the_rules_catch_a_bad_tree can show every rule failing on a bad tree.
"""
import ast
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# code lines (not blank and not a comment line; docstrings count). The total is the rule; a module has a budget of
# its own only where it would otherwise grow past what a reader holds, ~15-20% above its expected size. A module
# without an entry is held by the total alone.
TOTAL_BUDGET = 4000
BUDGET = {"model.py": 895, "formats.py": 565, "train.py": 550, "load.py": 390, "scorers.py": 265, "data.py": 300,
          "eval.py": 255, "benchmarks.py": 310, "navigation.py": 260}
MAX_COLS = 120
RUNTIME_LIBS = {"torch", "safetensors", "tokenizers", "PIL", "numpy", "tqdm", "huggingface_hub"}
# model.py is tensors only: torch, stdlib that does no I/O, and the leaf modules it wires in. Everything that reads a
# checkpoint folder (config.json, safetensors, the hub, tokenizer files) lives in load.py.
MODEL_IMPORTS = {"torch", "math", "dataclasses", "re", "functools", "itertools", "typing", "collections", "contextlib",
                 "operator", "enum", "warnings", "copy", "__future__", "perceivers", "token_select"}
NOT_LOADED_BY_MODEL = ("safetensors", "huggingface_hub", "tokenizers", "PIL")


def runtime_modules(root=ROOT):
    return sorted(f for f in os.listdir(root) if f.endswith(".py"))


def source(name, root=ROOT):
    with open(os.path.join(root, name), encoding="utf-8") as f:
        return f.read()


def code_lines(name, root=ROOT):
    return sum(1 for line in source(name, root).splitlines() if line.strip() and not line.strip().startswith("#"))


def over_budget(root=ROOT):
    counts = {f: code_lines(f, root) for f in runtime_modules(root)}
    over = [f"{f}: {n} code lines > {BUDGET[f]}" for f, n in counts.items() if f in BUDGET and n > BUDGET[f]]
    if sum(counts.values()) > TOTAL_BUDGET:
        over.append(f"total: {sum(counts.values())} code lines > {TOTAL_BUDGET} ({counts})")
    return over


def stale_budgets(root=ROOT):
    return sorted(set(BUDGET) - set(runtime_modules(root)))


def long_lines(root=ROOT):
    return [f"{f}:{i} ({len(line)} columns)" for f in runtime_modules(root)
            for i, line in enumerate(source(f, root).splitlines(), 1) if len(line) > MAX_COLS]


def missing_docstrings(root=ROOT):
    """Modules without a module docstring of at least a short sentence (what the module owns)."""
    return [f for f in runtime_modules(root) if len((ast.get_docstring(ast.parse(source(f, root))) or "").split()) < 5]


def imported_names(name, root=ROOT):
    """Every module name `name` imports, at the top or inside functions (relative imports aside)."""
    for node in ast.walk(ast.parse(source(name, root))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module


def model_imports_outside_tensors(root=ROOT):
    return sorted({n for n in imported_names("model.py", root) if n.split(".")[0] not in MODEL_IMPORTS})


def loaded_by_import_model(root=ROOT):
    """The libraries of NOT_LOADED_BY_MODEL that `import model` loads, in a fresh interpreter started in `root`."""
    code = ("import os, sys; sys.path.insert(0, os.getcwd()); import model; "
            "print(model.__file__); print(*sorted({m.split('.')[0] for m in sys.modules} & set(sys.argv[1:])))")
    p = subprocess.run([sys.executable, "-c", code, *NOT_LOADED_BY_MODEL], cwd=root, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    where, loaded = p.stdout.splitlines()[-2:]
    assert os.path.samefile(where, os.path.join(root, "model.py")), where
    return loaded.split()


def readme_files_section(root=ROOT):
    """The text of the README section whose heading contains "Files", up to the next heading of its level or above
    (lines inside ``` blocks are never headings)."""
    section, level, fenced = None, 0, False
    for line in source("README.md", root).splitlines():
        fenced ^= line.startswith("```")
        heading = None if fenced or line.startswith("```") else re.match(r"(#+) ", line)
        if section is None:
            if heading and "Files" in line:
                section, level = [], len(heading.group(1))
        elif heading and len(heading.group(1)) <= level:
            break
        else:
            section.append(line)
    assert section is not None, "README.md has no section whose heading contains 'Files'"
    return "\n".join(section)


def unlisted_in_readme(root=ROOT):
    text = readme_files_section(root)
    return [f for f in runtime_modules(root) if not re.search(r"(?<![\w./-])" + re.escape(f) + r"(?!\w)", text)]


def test_line_budgets():
    assert not over_budget(), over_budget()


def test_every_module_budget_names_a_module():
    assert not stale_budgets(), f"budgets for modules that do not exist: {stale_budgets()}"


def test_no_line_over_120_columns():
    assert not long_lines(), long_lines()


def test_every_module_has_a_docstring_saying_what_it_owns():
    assert not missing_docstrings(), f"no module docstring: {missing_docstrings()}"


def test_model_imports_only_torch_and_tensor_stdlib():
    assert not model_imports_outside_tensors(), f"model.py imports {model_imports_outside_tensors()}"


def test_import_model_loads_no_checkpoint_or_image_libraries():
    loaded = loaded_by_import_model()
    assert not loaded, f"`import model` loads {loaded}"


def test_readme_files_section_lists_every_module():
    assert not unlisted_in_readme(), f"README's Files section does not list {unlisted_in_readme()}"


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


def test_the_rules_catch_a_bad_tree(tmp_path):
    """Every rule above, run on a tree that breaks it, names the offender; and a clean module passes them all."""
    def write(name, text):
        (tmp_path / name).write_text(text, encoding="utf-8")

    write("model.py", "import json\nfrom safetensors import safe_open  # noqa\n\n# a comment\n"
          + "x = 1\n" * (BUDGET["model.py"] - 2) + "y = '" + "y" * MAX_COLS + "'\n")
    write("lean.py", '"""Owns nothing but a docstring of a short sentence."""\n\n    # indented comment\nx = 1\n')
    write("big.py", '"""A new module without a budget entry: held by the total only."""\n' + "x = 1\n" * TOTAL_BUDGET)
    write("README.md", "# t\n\n## Files\n\n```\n# not a heading\nmodel.py  lean.py\n```\n\n## Next\n\nbig.py\n")
    root = str(tmp_path)
    assert code_lines("lean.py", root) == 2 and code_lines("model.py", root) == BUDGET["model.py"] + 1
    over = over_budget(root)  # big.py: over the total, but a module without an entry is not over budget itself
    assert len(over) == 2 and over[0] == f"model.py: {BUDGET['model.py'] + 1} code lines > {BUDGET['model.py']}"
    assert over[1].startswith(f"total: {BUDGET['model.py'] + 1 + 2 + TOTAL_BUDGET + 1} code lines > {TOTAL_BUDGET}")
    assert stale_budgets(root) == sorted(set(BUDGET) - {"model.py"})
    assert long_lines(root) == [f"model.py:{BUDGET['model.py'] + 3} ({MAX_COLS + 6} columns)"]
    assert missing_docstrings(root) == ["model.py"]
    assert model_imports_outside_tensors(root) == ["json", "safetensors"]
    assert loaded_by_import_model(root) == ["safetensors"]
    assert unlisted_in_readme(root) == ["big.py"]


CLIS = ["train.py", "eval.py", "merge.py", "tools/world.py", "tools/dry_run.py", "tools/aitw.py", "tools/srp.py",
        "tools/synth.py", "tools/tiny_tokenizer.py", "tests/parity.py", "bench/decode.py", "bench/qwen_step.py",
        "bench/train_step.py", "bench/ui_select.py", "bench/eval_speed.py", "bench/memory_table.py",
        "bench/gpu_parity.py", "bench/baseline_memory.py", "tools/plot.py", "tools/demo_report.py"]


def test_every_cli_answers_help_and_writes_nothing(tmp_path):
    missing = {os.path.relpath(os.path.join(d, f), ROOT) for d in (ROOT, os.path.join(ROOT, "tools"),
               os.path.join(ROOT, "bench")) for f in os.listdir(d) if f.endswith(".py")} - set(CLIS)
    assert missing <= {"model.py", "load.py", "checkpoints.py", "benchmarks.py", "navigation.py", "data.py", "formats.py", "scorers.py",
                       "lora.py", "perceivers.py", "token_select.py", "tools/__init__.py", "tools/common.py"}, f"a CLI without this test: {missing}"
    for script in CLIS:
        run = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0 and run.stdout.lower().startswith("usage"), (script, run.stdout[-500:],
                                                                                 run.stderr[-500:])
        assert os.listdir(tmp_path) == [], (script, os.listdir(tmp_path))
