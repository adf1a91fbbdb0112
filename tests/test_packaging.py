"""Packaging: the core imports and runs with Lightning blocked, LookaheadCallback is a lazy attribute, and
the version has one source."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import lightning_lookahead

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 240  # seconds per subprocess


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    if proc.returncode != 0:
        pytest.fail(f"{args} exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _python(code: str, tmp_path: Path) -> str:
    """Run ``code`` in a fresh interpreter that imports this checkout's package (not an installed copy)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = _run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, env=env)
    return proc.stdout


# --------------------------------------------------------------------------- core without Lightning
BLOCK_LIGHTNING = """
import sys

class BlockLightning:  # as if only torch were installed
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("lightning", "pytorch_lightning", "lightning_fabric"):
            raise ImportError(f"{name} is blocked by the test")
        return None

sys.meta_path.insert(0, BlockLightning())
"""


def test_core_imports_and_runs_with_lightning_blocked(tmp_path):
    out = _python(
        BLOCK_LIGHTNING
        + f"""
import copy
import torch
import lightning_lookahead
from lightning_lookahead import Lookahead, NonFiniteError, RankMismatchError

assert lightning_lookahead.__file__.startswith({str(ROOT)!r}), lightning_lookahead.__file__
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
plain = copy.deepcopy(model)
x, y = torch.randn(16, 4), torch.randn(16, 1)

def train(net, steps):
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    la = Lookahead(k=3, alpha=0.5)
    if net is model:
        la.attach([opt], net)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    return la

start = [p.detach().clone() for p in model.parameters()]
la = train(model, 3)
train(plain, 3)
assert la.syncs == 1
for phi0, theta, p in zip(start, plain.parameters(), model.parameters()):
    torch.testing.assert_close(p, phi0 + 0.5 * (theta - phi0), rtol=0, atol=1e-6)  # one sync, by hand
assert not any(m.partition(".")[0] in ("lightning", "pytorch_lightning", "lightning_fabric") for m in sys.modules)
try:
    lightning_lookahead.LookaheadCallback
except ImportError as err:
    print("callback:", err)
print("ok", la.syncs, issubclass(NonFiniteError, FloatingPointError), issubclass(RankMismatchError, Exception))
""",
        tmp_path,
    )
    assert out.splitlines()[-2] == "callback: lightning is blocked by the test"
    assert out.splitlines()[-1] == "ok 1 True True"


def test_callback_is_imported_on_first_access(tmp_path):
    out = _python(
        """
        import sys
        import lightning_lookahead
        from hydra.utils import get_class

        print("before:", "lightning" in sys.modules, "lightning_lookahead.callback" in sys.modules)
        cls = lightning_lookahead.LookaheadCallback
        from lightning_lookahead.callback import LookaheadCallback
        from lightning.pytorch.callbacks import Callback

        assert cls is LookaheadCallback and issubclass(cls, Callback)
        assert get_class("lightning_lookahead.LookaheadCallback") is cls  # how Hydra's `_target_` resolves it
        print("after:", "lightning" in sys.modules, cls(k=3).k)
        """,
        tmp_path,
    )
    assert out.splitlines() == ["before: False False", "after: True 3"]


def test_public_names():
    from lightning_lookahead import LookaheadCallback  # noqa: F401  (the import the README shows)

    assert lightning_lookahead.__all__ == ["Lookahead", "LookaheadCallback", "NonFiniteError", "RankMismatchError"]
    assert set(lightning_lookahead.__all__) <= set(dir(lightning_lookahead))
    namespace: dict = {}
    exec("from lightning_lookahead import *", namespace)
    assert set(lightning_lookahead.__all__) <= set(namespace)
    with pytest.raises(AttributeError, match="has no attribute 'LookaheadCalback'"):
        lightning_lookahead.LookaheadCalback  # noqa: B018


# --------------------------------------------------------------------------- metadata
def test_one_version_source():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "lightning_lookahead.__version__"}
    assert "Typing :: Typed" in pyproject["project"]["classifiers"]
    assert (ROOT / "lightning_lookahead" / "py.typed").is_file()
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in changelog
    assert re.search(rf"^## \[{re.escape(lightning_lookahead.__version__)}\] - \d{{4}}-\d{{2}}-\d{{2}}$", changelog, re.M)
