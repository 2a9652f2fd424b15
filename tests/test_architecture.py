"""The architecture's promises, checked on the source: the training loop knows no router by name, the config
holds no router list, the README fits a page, the docs exist and are current, and every file a comment cites
is in the repository."""
import ast
import os
import re

import pytest

from pangu_moe.cli import main
from pangu_moe.routing import ROUTERS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "pangu_moe")
ROUTER_AGNOSTIC = ["train/trainer.py", "train/steps.py", "generate.py", "model/moe_layer.py"]
ALLOWED_ROUTING_IMPORTS = {"pangu_moe.routing.base", "pangu_moe.routing.registry"}


def _tree(relative):
    with open(os.path.join(PACKAGE, relative), encoding="utf-8") as fh:
        return ast.parse(fh.read())


def _router_words():
    names = {cls.__name__ for cls in ROUTERS.values()}
    return names, set(ROUTERS)


@pytest.mark.parametrize("relative", ROUTER_AGNOSTIC)
def test_the_training_path_names_no_router(relative):
    class_names, router_names = _router_words()
    tree = _tree(relative)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pangu_moe.routing"):
            assert node.module in ALLOWED_ROUTING_IMPORTS, f"{relative} imports {node.module}"
        if isinstance(node, ast.Name):
            assert node.id not in class_names, f"{relative} names {node.id}"
        if isinstance(node, ast.Attribute):
            assert node.attr not in class_names, f"{relative} names {node.attr}"
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            assert node.value not in router_names, f"{relative} tests the router name {node.value!r}"
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance":
            assert "Router" not in ast.unparse(node.args[1]), f"{relative}: {ast.unparse(node)}"


def test_config_validation_holds_no_router_names():
    _, router_names = _router_words()
    tree = _tree("config.py")
    validate = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "validate")
    found = [n.value for n in ast.walk(validate) if isinstance(n, ast.Constant) and n.value in router_names]
    assert not found, f"RunConfig.validate names routers {found}: their rules belong in Router.check"
    for node in tree.body:  # no module-level list of router names either
        if isinstance(node, ast.Assign) and isinstance(node.value, (ast.Tuple, ast.List)):
            values = {getattr(e, "value", None) for e in node.value.elts}
            assert len(values & router_names) < 2, f"config.py: {ast.unparse(node.targets[0])} lists routers"


def test_readme_fits_a_page_and_the_docs_exist():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as fh:
        assert len(fh.read().splitlines()) <= 150
    for page in ("architecture.md", "outputs.md", "configuration.md", "reliability.md"):
        assert os.path.getsize(os.path.join(REPO, "docs", page)) > 0, page
    dated = [p for p in os.listdir(os.path.join(REPO, "docs", "results")) if re.match(r"\d{4}-\d\d-\d\d-.+\.md$", p)]
    assert dated, "docs/results/ holds no dated results page"


def test_configuration_doc_is_current(capsys):
    """docs/configuration.md is `pangu-moe config --fields --markdown`, verbatim."""
    assert main(["config", "--fields", "--markdown"]) == 0
    with open(os.path.join(REPO, "docs", "configuration.md"), encoding="utf-8") as fh:
        assert fh.read() == capsys.readouterr().out, \
            "regenerate: pangu-moe config --fields --markdown > docs/configuration.md"


CITED = re.compile(r"(?<![\w/.$-])((?:pangu_moe|docs|tests|kernels|configs|run_scripts)/[\w./-]*\w)")
OUTSIDE = re.compile(r"DESIGN\b|\bspec/|\bspec (?:locmoe|routers|anchors|mindspore_cpu|style)|"
                     r"(?:locmoe|routers|anchors|mindspore_cpu|style)\.md")  # notes that are not in the repository
SOURCE_SUFFIXES = (".py", ".sh", ".h", ".cc", ".cpp", ".yaml")


def _sources():
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("build", "__pycache__")
                   and not d.endswith(".egg-info") and not os.path.islink(os.path.join(root, d))]
        for name in files:
            if name.endswith(SOURCE_SUFFIXES):
                yield os.path.join(root, name)


def _exists(path):
    path = path.rstrip(".")
    return any(os.path.exists(os.path.join(base, path)) for base in (REPO, PACKAGE, os.path.join(REPO, "kernels")))


def test_source_comments_cite_only_files_in_the_repository():
    missing = []
    for source in _sources():
        with open(source, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                where = f"{os.path.relpath(source, REPO)}:{number}"
                if OUTSIDE.search(line) and source != os.path.abspath(__file__):
                    missing.append(f"{where}: {line.strip()}")
                for path in CITED.findall(line):
                    if not _exists(path) and "*" not in path and "{" not in path:
                        missing.append(f"{where}: {path}")
    assert not missing, "\n".join(missing)


def test_package_data_is_found_inside_the_package():
    """The bench's and studies' default config, the msrun launcher and the kernel sources ship in the wheel
    (pyproject.toml package-data; tests/test_packaging.py installs one) and are found from the installed package,
    never by walking up to a checkout."""
    from pangu_moe.bench.ep import LAUNCHER
    from pangu_moe.configs import DEMO_CONFIG
    from pangu_moe.ops.build import KERNELS_DIR
    for path in (DEMO_CONFIG, LAUNCHER, str(KERNELS_DIR / "README.md")):
        assert os.path.isfile(path) and os.path.realpath(path).startswith(PACKAGE + os.sep), path
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(root, name), encoding="utf-8") as fh:
                    assert "dirname(os.path.dirname(os.path.dirname(" not in fh.read(), name
