"""scripts/check_imports.py: the package has no import cycles, and the checker finds the ones it should."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "check_imports.py"
pytestmark = pytest.mark.timeout(120)  # each test runs the script in a subprocess


def check(*args):
    p = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=100)
    return p.returncode, p.stdout, p.stderr


def write_pkg(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        f = root / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(textwrap.dedent(text))
    return root


def test_the_package_has_no_import_cycles():
    code, out, err = check(ROOT / "src")
    assert code == 0, out + err
    assert "no import cycles" in out


def test_planted_cycles_are_found(tmp_path):
    src = write_pkg(tmp_path / "src", {
        "pkg/__init__.py": "from pkg.api import run\n",  # a re-export: an edge from the package
        "pkg/api.py": "from pkg import util\n\ndef run():\n    return util.helper()\n",
        "pkg/util.py": "def helper():\n    from pkg.sub.deep import x  # in a function: still an edge\n    return x\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/deep.py": "from ..api import run\nx = 1\n",  # relative import closes api -> util -> deep -> api
        "pkg/a.py": "import pkg.b\n",
        "pkg/b.py": "from pkg.a import *\n",
        "pkg/clean.py": "import os\nfrom pkg.util import helper\n",
        "pkg/typed.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.clean import helper\n",
        "pkg/self_.py": "from pkg import self_\n",
    })
    code, out, _ = check(src)
    assert code == 1, out
    cycles = [line for line in out.splitlines() if line.startswith("import cycle")]
    assert len(cycles) == 3, out
    assert "import cycle (2 modules): pkg.a -> pkg.b -> pkg.a" in out
    assert "import cycle (3 modules): pkg.api -> pkg.util -> pkg.sub.deep -> pkg.api" in out
    assert "pkg.util -> pkg.sub.deep  (" in out and ", in helper)" in out  # the edge, its line and function
    assert "import cycle (self-import): pkg.self_ -> pkg.self_" in out
    assert "pkg.clean" not in "\n".join(cycles) and "pkg.typed" not in out  # not in any cycle


def test_package_reexport_closes_a_cycle(tmp_path):
    src = write_pkg(tmp_path / "src", {
        "pkg/__init__.py": "from pkg.core import thing\n",
        "pkg/core.py": "def thing():\n    from pkg import VERSION\n    return VERSION\n",
    })
    code, out, _ = check(src)
    assert code == 1 and "import cycle (2 modules): pkg -> pkg.core -> pkg" in out, out


def test_acyclic_package_passes(tmp_path):
    src = write_pkg(tmp_path / "src", {
        "pkg/__init__.py": "from pkg.api import run\n",
        "pkg/api.py": ("from pkg.util import helper\n\n"
                       "def run():\n    from pkg.sub import deep\n    return helper(deep.x)\n"),
        "pkg/util.py": "import json\n\ndef helper(x):\n    return json.dumps(x)\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/deep.py": "from .. import util\nx = 1\n",
    })
    code, out, err = check(src)
    assert code == 0, out + err
    assert out.startswith("no import cycles")


def test_long_functions_are_reported(tmp_path):
    ten = "".join(f"    x{i} = {i}\n" for i in range(8))  # def + 8 + return = 10 lines
    eleven = "".join(f"        x{i} = {i}\n" for i in range(9))  # def + 9 + return = 11 lines
    src = write_pkg(tmp_path / "src", {
        "pkg/__init__.py": "",
        "pkg/m.py": (f"@staticmethod\ndef ten_lines():\n{ten}    return 1\n\n\n"  # decorator not counted
                     f"class C:\n    def eleven(self):\n{eleven}        return 1\n\n\n"
                     f"def short():\n    return 2\n"),
    })
    code, out, _ = check(src, "--max-function-lines", 10)
    assert code == 1, out
    assert "pkg/m.py:15: C.eleven is 11 lines (> 10)" in out.replace("\\", "/")
    assert "ten_lines" not in out and "short" not in out
    code, out, _ = check(src, "--max-function-lines", 11)
    assert code == 0 and "no function longer than 11 lines" in out, out


def test_unparsable_file_is_an_error(tmp_path):
    src = write_pkg(tmp_path / "src", {"pkg/__init__.py": "", "pkg/bad.py": "def f(:\n"})
    code, _, err = check(src)
    assert code == 2 and "bad.py:1: does not parse" in err
