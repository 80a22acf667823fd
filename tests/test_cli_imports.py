"""Listing and showing commands load neither torch nor transformers (what makes them fast).

Checked by the modules a fresh process holds after the command, never by its time.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers")

# Runs one `adapt` command in this fresh interpreter, then prints the heavy modules it loaded.
PROBE = """
import json, sys
from adapterhub_c.cli.main import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    code = e.code or 0
else:
    code = 0
print(json.dumps({"loaded": [m for m in %r if m in sys.modules], "code": code}), file=sys.stderr)
""" % (HEAVY,)


def _run(home, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, "--home", str(home), *args], capture_output=True, text=True,
                          timeout=300)
    last = proc.stderr.strip().splitlines()[-1]
    return json.loads(last)


@pytest.mark.parametrize("args", [
    ("--help",), ("ls",), ("ls", "variants", "--json"), ("ls", "runs"), ("convert", "--help"),
    ("batch", "convert", "--help"), ("gc", "--dry-run"),
])
def test_listing_commands_import_no_torch(tmp_path, args):
    out = _run(tmp_path, *args)
    assert out["code"] == 0
    assert out["loaded"] == [], f"adapt {' '.join(args)} imported {out['loaded']}"


def test_show_and_lineage_import_no_torch(tmp_path):
    from adapterhub_c.registry import Registry
    from adapterhub_c.registry.models import BaseModel

    reg = Registry(home=tmp_path)
    with reg.session() as s:
        s.add(BaseModel(name="org/base", architecture="LlamaForCausalLM", params=1000))
    for args in (("show", "org/base"), ("show", "org/base", "--json"), ("lineage", "org/base")):
        out = _run(tmp_path, *args)
        assert out["code"] == 0, args
        assert out["loaded"] == [], f"adapt {' '.join(args)} imported {out['loaded']}"


def test_the_probe_sees_a_heavy_import(tmp_path):
    """The check above can fail: a command that does load torch is reported."""
    probe = PROBE.replace("from adapterhub_c.cli.main import main", "import torch  # noqa\nfrom adapterhub_c.cli.main import main")
    proc = subprocess.run([sys.executable, "-c", probe, "--home", str(tmp_path), "ls"], capture_output=True,
                          text=True, timeout=300)
    assert json.loads(proc.stderr.strip().splitlines()[-1])["loaded"] == ["torch"]
