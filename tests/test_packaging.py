"""Packaging: the core imports and runs with Lightning blocked, LookaheadCallback is a lazy attribute, the
version has one source, and the wheel ships py.typed and the Hydra configs, which compose in a user's app
outside the repository (presets and the off switch swap only the `lookahead` entry), also from a fresh
virtual environment (slow test)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import lightning_lookahead

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "lightning_lookahead" / "conf"
SEARCHPATH = "pkg://lightning_lookahead.conf"
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

    assert lightning_lookahead.__all__ == ["Lookahead", "LookaheadCallback", "LookaheadConfig", "NonFiniteError", "RankMismatchError"]
    assert set(lightning_lookahead.__all__) <= set(dir(lightning_lookahead))
    namespace: dict = {}
    exec("from lightning_lookahead import *", namespace)  # noqa: S102
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
    assert re.search(rf"^## \[{re.escape(lightning_lookahead.__version__)}\] - \d{{4}}-\d{{2}}-\d{{2}}$", changelog, re.MULTILINE)


# --------------------------------------------------------------------------- packaged Hydra configs
def _write_user_app(app: Path, entry: str = "lookahead: default") -> None:
    """A user's Hydra app that knows nothing of this repository; the callback configs come from the package.

    ``conf/`` is laid out like lightning-hydra-template: its own callbacks/default.yaml lists a checkpoint
    and a model summary and selects the package's Lookahead (``entry``: the group ``lookahead: default``,
    or ``lookahead``, the file callbacks/lookahead.yaml, the form documented first); experiment/snoo.yaml overrides
    that entry as the template's experiment configs do. ``minimal/`` (``--config-path minimal``) selects
    ``callbacks: lookahead``: Lookahead alone, the app has no callbacks/default.yaml of its own."""
    files = {
        "conf/config.yaml": f"""\
            defaults:
              - _self_
              - callbacks: default
              - experiment: null

            hydra:
              searchpath:
                - {SEARCHPATH}
            """,
        "minimal/config.yaml": f"""\
            defaults:
              - callbacks: lookahead
              - _self_

            hydra:
              searchpath:
                - {SEARCHPATH}
            """,
        "conf/callbacks/default.yaml": f"""\
            defaults:
              - model_checkpoint
              - {entry}
              - model_summary
              - _self_

            model_checkpoint:
              monitor: val/acc
              mode: max
              save_last: true
            """,
        "conf/callbacks/model_checkpoint.yaml": """\
            model_checkpoint:
              _target_: lightning.pytorch.callbacks.ModelCheckpoint
              monitor: null
              mode: min
              save_last: null
            """,
        "conf/callbacks/model_summary.yaml": """\
            model_summary:
              _target_: lightning.pytorch.callbacks.ModelSummary
              max_depth: -1
            """,
        "conf/experiment/snoo.yaml": """\
            # @package _global_
            defaults:
              - override /callbacks/lookahead: snoo

            callbacks:
              lookahead:
                k: 50
            """,
    }
    for name, text in files.items():
        (app / name).parent.mkdir(parents=True, exist_ok=True)
        (app / name).write_text(textwrap.dedent(text))
    (app / "app.py").write_text(
        textwrap.dedent(
            """\
            from importlib.resources import files

            import hydra
            from hydra.core.hydra_config import HydraConfig
            from hydra.utils import instantiate
            from lightning.pytorch.callbacks import ModelCheckpoint

            import lightning_lookahead


            @hydra.main(version_base="1.3", config_path="conf", config_name="config")
            def main(cfg):
                print("package:", lightning_lookahead.__file__)
                sources = HydraConfig.get().runtime.config_sources
                print("searchpath:", [f"{s.schema}://{s.path}" for s in sources if s.provider == "hydra.searchpath in main"])
                print("configs:", files("lightning_lookahead.conf"))
                for name, node in cfg.callbacks.items():
                    if node is None:
                        print(f"{name}: off")
                        continue
                    cb = instantiate(node)
                    if isinstance(cb, lightning_lookahead.LookaheadCallback):
                        print(f"{name}: {type(cb).__name__} k={cb.k} alpha={cb.alpha} outer_momentum={cb.outer_momentum}")
                    elif isinstance(cb, ModelCheckpoint):
                        print(f"{name}: {type(cb).__name__} monitor={cb.monitor} mode={cb.mode} save_last={cb.save_last}")
                    else:
                        print(f"{name}: {type(cb).__name__}")


            if __name__ == "__main__":
                main()
            """
        )
    )


@pytest.fixture(params=["lookahead: default", "lookahead"], ids=["group", "file"])
def user_app(tmp_path, request):
    """compose(config_path, *overrides): the callbacks node of the user app of :func:`_write_user_app`
    (config_path "conf" or "minimal"), composed on this checkout's package; its callbacks/default.yaml
    selects Lookahead as the group (`- lookahead: default`) or as the file (`- lookahead`)."""
    _write_user_app(tmp_path, request.param)

    def _compose(config_path: str, *overrides: str):
        with initialize_config_dir(config_dir=str(tmp_path / config_path), version_base="1.3"):
            return compose("config", overrides=list(overrides)).callbacks

    _compose.conf = tmp_path / "conf"
    return _compose


def _others(callbacks) -> dict:
    return {name: node for name, node in OmegaConf.to_container(callbacks).items() if name != "lookahead"}


def _packaged(preset: str):
    """The `lookahead` entry as the package's callbacks/lookahead/<preset>.yaml writes it."""
    return OmegaConf.load(CONF / "callbacks" / "lookahead" / f"{preset}.yaml")


def test_packaged_configs_compose_in_a_user_app(user_app):
    """Fast check on this checkout: the user app's callbacks/default.yaml finds the package's callbacks/lookahead
    group, and an app whose callbacks node is Lookahead alone (`callbacks: lookahead`) picks the entry with
    the same group; there the whole-node forms (`callbacks=snoo`, which mean "callbacks/default.yaml with
    the entry swapped") stop with Hydra's message instead of composing something else."""
    from hydra.errors import MissingConfigException

    default = user_app("conf")
    assert list(default) == ["model_checkpoint", "lookahead", "model_summary"]
    assert default.lookahead == _packaged("default")
    assert default.model_checkpoint.monitor == "val/acc"
    assert user_app("conf", "callbacks.lookahead.k=7").lookahead.k == 7
    assert user_app("minimal") == {"lookahead": _packaged("default")}
    assert user_app("minimal", "callbacks/lookahead=none") == {"lookahead": None}
    assert user_app("minimal", "callbacks/lookahead=snoo") == {"lookahead": _packaged("snoo")}
    assert user_app("minimal", "callbacks.lookahead.k=7") == {"lookahead": {**_packaged("default"), "k": 7}}
    for override in ("callbacks=snoo", "callbacks=no_lookahead"):
        with pytest.raises(MissingConfigException, match=f"In 'callbacks/{override[10:]}': Could not load 'callbacks/default'"):
            user_app("minimal", override)


@pytest.mark.parametrize(
    "overrides, k",
    [
        (["callbacks/lookahead=snoo"], 28),
        (["callbacks=snoo"], 28),
        (["callbacks/lookahead=diloco_outer"], 20),
        (["experiment=snoo"], 50),  # `- override /callbacks/lookahead: snoo` in an experiment config
        (["callbacks/lookahead=none"], None),
        (["callbacks=no_lookahead"], None),
        (["~callbacks.lookahead"], None),
    ],
)
def test_user_app_swaps_only_the_lookahead_entry(user_app, overrides, k):
    """Issue 16, item 8, in an app outside the repository: a preset or the off switch changes the `lookahead`
    entry and keeps the app's other callbacks (`callbacks=snoo` used to replace the whole callbacks node)."""
    default = user_app("conf")
    callbacks = user_app("conf", *overrides)
    assert _others(callbacks) == _others(default)
    assert (callbacks.get("lookahead") or {}).get("k") == k
    if overrides == ["callbacks/lookahead=snoo"]:
        assert callbacks.lookahead == _packaged("snoo")


def test_user_app_sweep_has_the_same_other_callbacks(user_app):
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(["callbacks/lookahead=default,snoo,none"])
    (jobs,) = BasicSweeper.split_arguments(parsed, max_batch_size=None)  # what `--multirun` runs
    runs = [user_app("conf", *job) for job in jobs]
    assert [(run.lookahead or {}).get("k") for run in runs] == [5, 28, None]
    assert all(_others(run) == _others(runs[0]) for run in runs)
    assert set(_others(runs[0])) == {"model_checkpoint", "model_summary"}


def test_user_app_without_lookahead_fails_clearly_or_appends(user_app):
    """An app whose callbacks/default.yaml does not select Lookahead: the presets fail with Hydra's own
    message instead of dropping the other callbacks; `+callbacks/lookahead=snoo` appends the entry."""
    from hydra.errors import ConfigCompositionException

    default = user_app.conf / "callbacks" / "default.yaml"
    default.write_text(default.read_text().replace("  - lookahead: default\n", "").replace("  - lookahead\n", ""))
    assert "lookahead" not in user_app("conf")
    for override in ("callbacks=snoo", "callbacks/lookahead=snoo", "callbacks=no_lookahead"):
        with pytest.raises(ConfigCompositionException, match="Could not override 'callbacks/lookahead'"):
            user_app("conf", override)
    appended = user_app("conf", "+callbacks/lookahead=snoo")
    assert appended.lookahead == _packaged("snoo") and appended.model_checkpoint.monitor == "val/acc"


def _copy_source(dst: Path) -> Path:
    """The checkout as `pip wheel .` sees it, minus VCS and build leftovers (the build writes build/ and
    *.egg-info into its source folder; building a copy keeps the checkout clean and runs in parallel)."""
    ignore = shutil.ignore_patterns(
        ".git", "__pycache__", "*.egg-info", "build", "dist", "logs", "outputs", "multirun", "lightning_logs",
        ".pytest_cache", ".benchmarks", "*.ckpt", ".venv", "venv",
    )  # fmt: skip
    shutil.copytree(ROOT, dst, ignore=ignore)
    return dst


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_wheel_installs_into_a_fresh_venv_and_its_configs_compose(tmp_path_factory):
    work = tmp_path_factory.mktemp("packaging")
    assert not work.is_relative_to(ROOT)
    offline = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    offline.pop("PYTHONPATH", None)  # nothing may shadow the copy installed in the venv

    # 1. build the wheel offline (no isolation: setuptools comes from this interpreter)
    src = _copy_source(work / "src")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", str(work / "wheels"), "."], cwd=src, env=offline)  # fmt: skip
    (wheel,) = (work / "wheels").glob("lightning_lookahead-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "lightning_lookahead/py.typed" in names
    yamls = {str(p.relative_to(ROOT).as_posix()) for p in CONF.rglob("*.yaml")}
    assert {
        "lightning_lookahead/conf/callbacks/lookahead.yaml",
        "lightning_lookahead/conf/callbacks/no_lookahead.yaml",
        "lightning_lookahead/conf/callbacks/lookahead/snoo.yaml",  # nested group folders ship too
        "lightning_lookahead/conf/callbacks/lookahead/none.yaml",
    } <= yamls
    assert yamls <= names, sorted(yamls - names)
    metadata = zipfile.ZipFile(wheel).read(f"lightning_lookahead-{lightning_lookahead.__version__}.dist-info/METADATA")
    assert f"\nVersion: {lightning_lookahead.__version__}\n" in metadata.decode()

    # 2. a fresh venv outside the repository; torch, lightning and hydra come from the system site-packages
    venv = work / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], cwd=work, env=offline)
    python = venv / "bin" / "python"
    # the system pip, run by the venv's interpreter, installs into the venv; --ignore-installed leaves any
    # lightning-lookahead of the system site-packages (e.g. an editable install) untouched
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", str(wheel)],
         cwd=work, env=offline)  # fmt: skip

    # 3. a user's Hydra app in a directory outside the repository, composing the installed package's config:
    # a sweep over the presets keeps the app's own callbacks in every job and swaps the `lookahead` entry
    app = work / "app"
    _write_user_app(app)
    proc = _run([str(python), "app.py", "--multirun", "callbacks/lookahead=default,snoo,none"], cwd=app, env=offline)
    lines = proc.stdout.splitlines()
    packages = [line.split(": ", 1)[1] for line in lines if line.startswith("package: ")]
    site_packages = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    assert packages == [str(site_packages / "lightning_lookahead" / "__init__.py")] * 3, lines
    assert f"searchpath: ['{SEARCHPATH}']" in lines
    assert f"configs: {site_packages / 'lightning_lookahead' / 'conf'}" in lines
    assert [line for line in lines if line.startswith("lookahead: ")] == [
        "lookahead: LookaheadCallback k=5 alpha=0.5 outer_momentum=0.0",
        "lookahead: LookaheadCallback k=28 alpha=0.68 outer_momentum=0.37",
        "lookahead: off",
    ]
    assert [line for line in lines if line.startswith(("model_checkpoint: ", "model_summary: "))] == [
        "model_checkpoint: ModelCheckpoint monitor=val/acc mode=max save_last=True",
        "model_summary: ModelSummary",
    ] * 3

    # 4. an app whose callbacks node is Lookahead alone (`callbacks: lookahead`): the same group picks the entry
    proc = _run([str(python), "app.py", "--config-path", "minimal", "--multirun", "callbacks/lookahead=default,snoo,none"],
                cwd=app, env=offline)  # fmt: skip
    assert [line for line in proc.stdout.splitlines() if line.startswith(("lookahead: ", "model_"))] == [
        "lookahead: LookaheadCallback k=5 alpha=0.5 outer_momentum=0.0",
        "lookahead: LookaheadCallback k=28 alpha=0.68 outer_momentum=0.37",
        "lookahead: off",
    ]
