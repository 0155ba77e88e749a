"""The docs' drift check (`docs/code_names.py`, run by `make docs`): a page that names a module, a CLI
command or flag, or a make target the code does not have is reported with the page, the name and what
it is not; the real pages and the README pass. Plain calls: no mkdocs build, nothing imported but the CLI.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.helpers import ROOT


def load_checker():
    spec = importlib.util.spec_from_file_location("code_names", ROOT / "docs" / "code_names.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


code_names = load_checker()


@pytest.fixture(scope="module")
def code():
    return code_names.Code.of(ROOT)


def reported(markdown: str, code) -> list[str]:
    return [str(finding) for finding in code_names.findings(markdown, "docs/page.md", code)]


@pytest.mark.parametrize(
    ("markdown", "expected"),
    [
        ("See `fmnist/serving/no_such.py`.", "docs/page.md: `fmnist/serving/no_such.py` is not a file or folder"),
        ("`tests/test_docs_drift.py::test_none`", "names no `test_none` in tests/test_docs_drift.py"),
        ("`flows.no_such`", "`flows.no_such` is not a module or a name: flows has no `no_such`"),
        ("`fmnist.data.incoming.NO_SUCH`", "fmnist.data.incoming has no `NO_SUCH`"),
        ("`fashion-mnist frobnicate`", "`frobnicate` is not a command of `fashion-mnist`"),
        ("`fashion-mnist serve --no-such-flag`", "`--no-such-flag` is not a flag of `fashion-mnist serve`"),
        ("`review --sumbit`", "`--sumbit` is not a flag of `fashion-mnist review`"),
        ("`fashion-mnist automations aply`", "`aply` is not a command of `fashion-mnist automations`"),
        ("`fashion-mnist --registry s3://b/r versions --nope`", "`--nope` is not a flag of `fashion-mnist versions`"),
        ("```bash\nfashion-mnist serve \\\n  --port 1 --nope\n```", "`--nope` is not a flag of `fashion-mnist serve`"),
        ("`make tests`", "`make tests` is not a make command: `tests` is not a target"),
        ("```bash\nmake deploy && make worker-cpuu\n```", "`worker-cpuu` is not a target"),
    ],
)
def test_a_name_the_code_does_not_have_is_reported(markdown: str, expected: str, code) -> None:
    found = reported(markdown, code)
    assert len(found) == 1 and expected in found[0], found


@pytest.mark.parametrize(
    "markdown",
    [
        "`fmnist/serving/`, `fmnist/data/drift.py`, `tests/test_docs_drift.py::reported`, `flows.run_once`",
        "`fmnist.data.incoming.MAX_BATCH_ROWS`, `fmnist.serving.edge.EdgeLimits.rate_per_client`",
        "`fashion-mnist --registry s3://b/r versions`, `fashion-mnist automations apply automations.yaml`",
        "`fashion-mnist serve --port=8501 --edge`, `serve --edge`, `fashion-mnist <command> --help`",
        "`make run`, `make deploy-cluster FMNIST_DATA_ROOT=s3://b/d`, `make retrain-now PARAMS='{…}'`",
        "```bash\nmake run    # make sure it ran\n```",
        "```text\nmake a version champion\n```",  # the CLI's help is prose
        "`tests/test_e2e*.py`, `s3://fmnist/data/raw/`, `fashion-mnist.batch.quarantined`",  # no one file; a URL
        "Make sure the make targets are run.",  # prose, not code
    ],
)
def test_names_the_code_has_pass(markdown: str, code) -> None:
    assert reported(markdown, code) == []


def test_the_docs_and_the_readme_name_only_what_the_code_has(code) -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    found = [str(f) for page in pages for f in code_names.findings(page.read_text(), page.name, code)]
    assert found == []
